"""Describe an environment's distributions and module locations, as JSON, without importing them.

This file is also run as a script by another interpreter (`--python PATH`), so it must stay
self-contained: standard library only, no relative imports.
"""
import json
import sys


def _dist_info(dist):
    path = getattr(dist, "_path", None)
    return str(path) if path is not None else None


def _direct_url(dist):
    try:
        text = dist.read_text("direct_url.json")
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


def _distribution(name, paths):
    from importlib import metadata

    found = list(metadata.distributions(name=name, path=paths)) if paths is not None else []
    if paths is None:
        try:
            found = [metadata.distribution(name)]
        except metadata.PackageNotFoundError:
            found = []
    if not found:
        return None
    dist = found[0]
    direct = _direct_url(dist) or {}
    return {
        "name": dist.metadata["Name"],
        "version": dist.version,
        "dist_info": _dist_info(dist),
        "editable": bool(direct.get("dir_info", {}).get("editable")),
        "installer": (dist.read_text("INSTALLER") or "").strip() or None,
    }


def _module(name, paths):
    from importlib.machinery import PathFinder
    from importlib.util import find_spec

    spec = PathFinder.find_spec(name, paths) if paths is not None else find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return {"module_dir": list(spec.submodule_search_locations)[0]}


def describe(packages, paths=None):
    """PACKAGES: [[distribution, module], ...]; PATHS: search these instead of sys.path."""
    import sysconfig

    return {
        "python": sys.executable,
        "python_version": "%d.%d.%d" % sys.version_info[:3],
        "purelib": sysconfig.get_paths()["purelib"],
        "distributions": {dist: _distribution(dist, paths) for dist, _ in packages},
        "modules": {module: _module(module, paths) for _, module in packages},
    }


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    json.dump(describe(request["packages"], request.get("paths")), sys.stdout)
