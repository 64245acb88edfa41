"""Describe an environment's distributions and module locations, as JSON, without importing them.

This file is also run as a script by another interpreter (`--python PATH`), so it must stay
self-contained: standard library only, no relative imports.

Hand-written lookup of a `*.dist-info` (or `*.egg-info`) directory on the search path, reading only
its Name and Version headers, because importlib.metadata (email, zipfile, csv, its finders) costs
more than the rest of `verify`; anything this lookup does not find is asked of importlib.metadata,
so no layout it knows is lost.
"""
import json
import os
import sys

_SUFFIXES = (".dist-info", ".egg-info")
_METADATA = {".dist-info": "METADATA", ".egg-info": "PKG-INFO"}


def _normalize(name):
    """PEP 503 normalisation with '_' as separator (as dist-info directory names spell it)."""
    name = name.lower().replace("-", "_").replace(".", "_")
    while "__" in name:
        name = name.replace("__", "_")
    return name


def _read(path):
    try:
        with open(path, "rb") as handle:
            return handle.read(1 << 20).decode("utf-8", "surrogateescape")
    except OSError:
        return None


def _headers(text):
    """Name and Version from the header block of a METADATA file."""
    found = {}
    for line in text.splitlines():
        if not line.strip():
            break
        key, sep, value = line.partition(":")
        if sep and key in ("Name", "Version") and key not in found:
            found[key] = value.strip()
    return found


def _info_dirs(entry, wanted):
    """Metadata directories for normalised name WANTED directly in ENTRY, in directory order (the
    order importlib.metadata takes them in, so a stale second dist-info resolves as it did)."""
    try:
        names = os.listdir(entry or ".")
    except OSError:
        return []
    found = []
    for name in names:
        suffix = next((s for s in _SUFFIXES if name.endswith(s)), None)
        if suffix and _normalize(name[:-len(suffix)].partition("-")[0]) == wanted:
            found.append((name, suffix))
    return found


def _scan(name, paths):
    """The first metadata directory of distribution NAME along PATHS with a readable version."""
    wanted = _normalize(name)
    for entry in paths:
        for dirname, suffix in _info_dirs(entry, wanted):
            path = os.path.join(entry or ".", dirname)
            text = _read(os.path.join(path, _METADATA[suffix]))
            headers = _headers(text) if text is not None else {}
            if headers.get("Version") and _normalize(headers.get("Name", name)) == wanted:
                return path, headers
    return None


def _direct_url(path):
    text = _read(os.path.join(path, "direct_url.json"))
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _distribution(name, paths):
    found = _scan(name, sys.path if paths is None else paths)
    if found is None:
        return _metadata_distribution(name, paths)
    path, headers = found
    direct = _direct_url(path) or {}
    dir_info = direct.get("dir_info") if isinstance(direct, dict) else None
    return {
        "name": headers.get("Name", name),
        "version": headers["Version"],
        "dist_info": os.path.abspath(path),
        "editable": bool(isinstance(dir_info, dict) and dir_info.get("editable")),
        "installer": (_read(os.path.join(path, "INSTALLER")) or "").strip() or None,
    }


def _metadata_distribution(name, paths):
    """importlib.metadata's answer, for layouts the directory lookup does not know (zips, finders)."""
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
    path = getattr(dist, "_path", None)
    try:
        direct = json.loads(dist.read_text("direct_url.json") or "null") or {}
    except (OSError, ValueError):
        direct = {}
    return {
        "name": dist.metadata["Name"],
        "version": dist.version,
        "dist_info": str(path) if path is not None else None,
        "editable": bool(direct.get("dir_info", {}).get("editable")),
        "installer": (dist.read_text("INSTALLER") or "").strip() or None,
    }


def _find_spec(name):
    """importlib.util.find_spec for a top-level name, without importing importlib.util."""
    module = sys.modules.get(name)
    if module is not None:
        return getattr(module, "__spec__", None)
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        spec = find(name, None) if find is not None else None
        if spec is not None:
            return spec
    return None


def _module(name, paths):
    from importlib.machinery import PathFinder

    spec = PathFinder.find_spec(name, paths) if paths is not None else _find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return {"module_dir": list(spec.submodule_search_locations)[0]}


def _purelib():
    """sysconfig's purelib; the sysconfig module is imported only when the venv layout does not say."""
    version = "python%d.%d" % sys.version_info[:2]
    guess = os.path.join(sys.prefix, "lib", version, "site-packages")
    if os.name == "posix" and sys.platlibdir == "lib" and not sys.flags.no_site:
        import site

        if guess in site.getsitepackages():
            return guess
    import sysconfig

    return sysconfig.get_paths()["purelib"]


def describe(packages, paths=None):
    """PACKAGES: [[distribution, module], ...]; PATHS: search these instead of sys.path."""
    return {
        "python": sys.executable,
        "python_version": "%d.%d.%d" % sys.version_info[:3],
        "purelib": _purelib(),
        "distributions": {dist: _distribution(dist, paths) for dist, _ in packages},
        "modules": {module: _module(module, paths) for _, module in packages},
    }


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    json.dump(describe(request["packages"], request.get("paths")), sys.stdout)
