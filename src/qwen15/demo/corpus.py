"""Pretraining text that ships with every Python: the documentation strings of standard-library modules."""

from __future__ import annotations

import importlib
import inspect
import warnings

MODULES = (
    "abc",
    "argparse",
    "array",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "cmath",
    "codecs",
    "collections",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fnmatch",
    "fractions",
    "functools",
    "getopt",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "http.client",
    "http.server",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "math",
    "mimetypes",
    "numbers",
    "operator",
    "os",
    "os.path",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "signal",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "timeit",
    "tokenize",
    "traceback",
    "types",
    "typing",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "weakref",
    "zipfile",
    "zlib",
)


def python_docs(max_chars: int) -> list[str]:
    """Docstrings of the modules above and of their public classes and functions, in a fixed order, up to
    `max_chars` characters in total."""
    out: list[str] = []
    total = 0
    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            objects = [module] + [
                getattr(module, attr) for attr in sorted(vars(module)) if not attr.startswith("_")
            ]
            for obj in objects:
                if not (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj)):
                    continue
                doc = inspect.getdoc(obj)
                if not doc or len(doc) < 80 or doc in seen:
                    continue
                seen.add(doc)
                out.append(doc)
                total += len(doc)
                if total >= max_chars:
                    return out
    return out
