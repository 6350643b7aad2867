"""The core library needs only its declared dependencies; extras fail with a hint."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("sklearn", "mlxtend", "mnist1d", "matplotlib", "tensorboardX", "pandas")


def _requirement_name(req: str) -> str:
    for sep in "<>=!~[; ":
        req = req.split(sep)[0]
    return req.lower().replace("_", "-")


def test_core_dependencies_exclude_the_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    for heavy in ("scikit-learn", "mlxtend", "mnist1d", "matplotlib", "tensorboardx", "pandas"):
        assert heavy not in core, heavy
    extras = project["optional-dependencies"]
    assert {"data", "plots", "tensorboard", "all", "test"} <= set(extras)


def test_core_runs_without_the_extras(tmp_path):
    # Block every optional package as if it were not installed.
    script = textwrap.dedent(
        f"""
        import sys, importlib.abc
        BLOCKED = {OPTIONAL!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None
        sys.meta_path.insert(0, Block())

        import jax, jax.numpy as jnp, optax, flatjax, flatjax.training, flatjax.data
        opt = flatjax.entropy_sgd(0.1, inner_steps=2, coupling=1.0)
        w = jnp.ones(3)
        g = lambda p, i: 2.0 * p
        updates, _ = opt.update(g(w, 0), opt.init(w), w, grad_fn=g)
        assert bool(jnp.all(optax.apply_updates(w, updates) < w))
        flatjax.replicated_sgd(0.1, num_replicas=2, coupling=0.1)

        from flatjax._extras import MissingExtraError
        try:
            flatjax.data.load_arrays("digits", "train", data_dir=sys.argv[1])
        except MissingExtraError as e:
            print("MESSAGE:", e)
        else:
            raise SystemExit("digits loaded without scikit-learn")
        assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    message = out.stdout.split("MESSAGE:", 1)[1].strip()
    assert "scikit-learn" in message and "pip install -e '.[data]'" in message
    assert "\n" not in message
