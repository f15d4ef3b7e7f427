"""The package layout says which process runs a module (docs/architecture.md, "Layout").

Read from the source with ast: every `import omni_httpd...` and `from omni_httpd... import`
anywhere in a module (function bodies included, where the daemon imports lazily).
- master and console never import worker modules (the master must not load the
  worker's protocols or DB thread; the console runs in the master);
- worker never imports master or console;
- common imports none of them.
"""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "omni_httpd")

FORBIDDEN = {
    "master": ("omni_httpd.worker",),
    "console": ("omni_httpd.worker",),
    "worker": ("omni_httpd.master", "omni_httpd.console"),
    "common": ("omni_httpd.master", "omni_httpd.console", "omni_httpd.worker"),
}


def modules():
    for folder, _dirs, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                yield os.path.relpath(path, PACKAGE).split(os.sep)[0], path


def imported(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, node.module + "." + alias.name


def test_every_module_lives_in_the_folder_of_its_process():
    top = sorted(name for name in os.listdir(PACKAGE) if name.endswith(".py"))
    assert top == ["__init__.py"], "modules outside a process folder: %s" % top
    assert set(name for name, _ in modules()) - {"__init__.py"} <= set(FORBIDDEN) | {"sql"}


def test_imports_follow_the_process_boundaries():
    violations = []
    for area, path in modules():
        for lineno, name in imported(path):
            for prefix in FORBIDDEN.get(area, ()):
                if name == prefix or name.startswith(prefix + "."):
                    violations.append("%s:%d imports %s" % (os.path.relpath(path, ROOT), lineno, name))
    assert violations == []
