"""Untrusted input: no code path of the repository unpickles or evaluates what it reads.

Run files and caches are safetensors, JSON and .npy; this scans the Python sources (package,
experiments, benchmarks, tests, tools, setup.py) for what could run code from a file: pickle and
its relatives (imports of pickle, dill, joblib, shelve, marshal, ...), `torch.load` without
`weights_only=True`, `torch.jit.load`, `numpy.load(allow_pickle=...)` other than False,
`yaml.load` without a safe loader, `pandas.read_pickle`, and the builtins `eval` and `exec`.
The scanner is checked against a sample of each pattern first, so the scan cannot pass vacuously.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ["pep_kernels", "experiments", "benchmarks", "tests", "tools", "setup.py"]
BANNED_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "pickletools"}


def dotted(node):
    """'torch.serialization.load' for an attribute chain, None for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id] + parts[::-1])
    return None


def keyword(call, name):
    return next((k.value for k in call.keywords if k.arg == name), None)


def is_constant(node, value):
    return isinstance(node, ast.Constant) and node.value is value


def violations(source, filename="<source>"):
    """(line, what) for every unsafe loading pattern in Python `source`."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in BANNED_MODULES:
            found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Call):
            name = dotted(node.func)
            if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                found.append((node.lineno, f"builtin {node.func.id}()"))
            elif name is None:
                continue
            elif name in ("torch.load", "torch.serialization.load"):
                if not is_constant(keyword(node, "weights_only"), True):
                    found.append((node.lineno, f"{name} without weights_only=True"))
            elif name in ("torch.jit.load", "torch.package.PackageImporter"):
                found.append((node.lineno, name))
            elif name in ("np.load", "numpy.load"):
                allow = keyword(node, "allow_pickle")
                if allow is not None and not is_constant(allow, False):
                    found.append((node.lineno, f"{name}(allow_pickle=...)"))
            elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
                loader = keyword(node, "Loader")
                if name != "yaml.load" or dotted(loader) not in ("yaml.SafeLoader", "yaml.CSafeLoader"):
                    found.append((node.lineno, f"{name} without a safe loader"))
            elif name.endswith("read_pickle"):
                found.append((node.lineno, name))
    return found


def test_scanner_finds_each_pattern():
    bad = {
        "import pickle": "import pickle",
        "from joblib import load": "from joblib import ...",
        "torch.load(path)": "torch.load without weights_only=True",
        "torch.load(path, weights_only=False)": "torch.load without weights_only=True",
        "torch.jit.load(path)": "torch.jit.load",
        "np.load(path, allow_pickle=True)": "np.load(allow_pickle=...)",
        "yaml.load(text)": "yaml.load without a safe loader",
        "pd.read_pickle(path)": "pd.read_pickle",
        "eval(text)": "builtin eval()",
        "exec(text)": "builtin exec()",
    }
    for source, what in bad.items():
        assert [w for _, w in violations(source)] == [what], source
    fine = ["torch.load(path, weights_only=True)", "np.load(path)", "np.load(path, allow_pickle=False)",
            "model.eval()", "yaml.load(text, Loader=yaml.SafeLoader)", "json.loads(text)", "load_file(path)"]
    for source in fine:
        assert violations(source) == [], source


def test_no_unsafe_loading_in_the_repository():
    files = [p for entry in SCANNED
             for p in ([ROOT / entry] if entry.endswith(".py") else (ROOT / entry).rglob("*.py"))]
    assert len(files) > 20 and any(p.name == "checkpoint.py" for p in files)
    found = [f"{p.relative_to(ROOT)}:{line}: {what}" for p in files
             for line, what in violations(p.read_text(encoding="utf-8"), str(p))]
    assert not found, "unsafe loading of untrusted input:\n" + "\n".join(found)


def test_run_files_are_read_with_safetensors():
    """checkpoint.load (every run file: checkpoints, snapshots, initial states, retrained models)
    reads safetensors, whose format holds no code."""
    source = (ROOT / "pep_kernels" / "train" / "checkpoint.py").read_text()
    assert "from safetensors" in source and "torch.load" not in source
