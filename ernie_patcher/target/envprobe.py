"""Describe an environment's distributions and module locations, as JSON, without importing them,
and the bytecode its interpreter would load for given source files (bytecode_facts).

This file is also run as a script by another interpreter (`--python PATH`), so it must stay
self-contained: standard library only, no relative imports, syntax of the oldest Python it serves.

Hand-written lookup of a `*.dist-info` (or `*.egg-info`) directory on the search path, reading only
its Name and Version headers, because importlib.metadata (email, zipfile, csv, its finders) costs
more than the rest of `verify`; anything this lookup does not find is asked of importlib.metadata,
so no layout it knows is lost.
"""
import json
import os
import stat
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
    """At most 1 MiB of the regular file PATH, None when it is anything else: opened non-blocking and
    not through a symlink at its name, so a FIFO planted as METADATA never hangs the caller."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(1 << 20).decode("utf-8", "surrogateescape")
    except OSError:
        return None
    finally:
        os.close(fd)


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
    """The first metadata directory of distribution NAME along PATHS with a readable version; False
    when there are such directories but none is readable (then importlib.metadata is not asked:
    it would open a FIFO planted as METADATA and wait forever)."""
    wanted = _normalize(name)
    seen = False
    for entry in paths:
        for dirname, suffix in _info_dirs(entry, wanted):
            seen = True
            path = os.path.join(entry or ".", dirname)
            text = _read(os.path.join(path, _METADATA[suffix]))
            headers = _headers(text) if text is not None else {}
            if headers.get("Version") and _normalize(headers.get("Name", name)) == wanted:
                return path, headers
    return False if seen else None


def _direct_url(path):
    text = _read(os.path.join(path, "direct_url.json"))
    try:
        return json.loads(text) if text else None
    except (ValueError, RecursionError):
        return None


def _distribution(name, paths):
    found = _scan(name, sys.path if paths is None else paths)
    if found is False:
        return None
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
    except (OSError, ValueError, RecursionError):
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


def _module(name, paths, editable=None):
    """Where package NAME is imported from along PATHS (None: this interpreter's import system); else
    from EDITABLE (module -> directory, the editable finders a .pth would install: they come after
    the path finder on sys.meta_path)."""
    from importlib.machinery import PathFinder

    spec = PathFinder.find_spec(name, paths) if paths is not None else _find_spec(name)
    if spec is None and editable and os.path.isdir(editable.get(name) or ""):
        return {"module_dir": editable[name]}
    if spec is None or not spec.submodule_search_locations:
        return None
    return {"module_dir": list(spec.submodule_search_locations)[0]}


def _purelib():
    """sysconfig's purelib; the sysconfig module is imported only when the venv layout does not say."""
    version = "python%d.%d" % sys.version_info[:2]
    guess = os.path.join(sys.prefix, "lib", version, "site-packages")
    if os.name == "posix" and getattr(sys, "platlibdir", "lib") == "lib" and not sys.flags.no_site:
        import site

        if guess in site.getsitepackages():
            return guess
    import sysconfig

    return sysconfig.get_paths()["purelib"]


# The bytecode an interpreter would load for a source file (bytecode_facts). Hand-written from
# importlib._bootstrap_external (SourceLoader.get_code, _classify_pyc, _validate_*_pyc), whose
# functions are private and differ between versions: a .pyc is loaded when its magic is this
# interpreter's and its header matches the source (mtime and size; or, hash-based, the source hash
# when checked -- never checked for unchecked-hash bytecode).
PYC_CAP = 256 << 20
_HASH_BASED, _CHECK_SOURCE = 0b01, 0b10
_READ = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def sha256_hex(data):
    try:  # the interpreter's own sha256: loading OpenSSL (hashlib) costs more than a verify
        from _sha256 import sha256
    except ImportError:
        try:
            from _sha2 import sha256
        except ImportError:
            from hashlib import sha256
    return sha256(data).hexdigest()


def _anonymous(code):
    """CODE and the code objects in its constants without their file name: the same source
    compiled at another path (an environment moved or copied) is the same code."""
    code_type = type(code)
    consts = tuple(_anonymous(c) if isinstance(c, code_type) else c for c in code.co_consts)
    return code.replace(co_filename="", co_consts=consts)


def code_digest(code):
    """sha256 of CODE (a code object) without its file name, marshalled in version 2 (no
    references: two marshallings of equal code differ by references, never in version 2)."""
    import marshal

    try:
        return sha256_hex(marshal.dumps(_anonymous(code), 2))
    except ValueError:  # a constant version 2 cannot hold: this interpreter's own format
        return sha256_hex(marshal.dumps(_anonymous(code)))


def _read_capped(path, follow=False):
    """The bytes of regular file PATH (no-follow unless FOLLOW), at most PYC_CAP; an OSError else."""
    fd = os.open(path, _READ if not follow else _READ & ~getattr(os, "O_NOFOLLOW", 0))
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode) or found.st_size > PYC_CAP:
            raise OSError("not a regular file of at most %d bytes" % PYC_CAP)
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > PYC_CAP:
                raise OSError("more than %d bytes" % PYC_CAP)
            chunks.append(chunk)
    finally:
        os.close(fd)


def _kind(mode):
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO")):
        if test(mode):
            return name
    return "not a regular file"


class _Source:
    """A source file as the import system sees it: its stat; its bytes, hash and compiled code,
    read and computed only when a bytecode file needs them."""

    def __init__(self, path):
        self.path = path
        self.stat = os.stat(path)
        self._data = None
        self._code = {}

    def data(self):
        if self._data is None:
            self._data = _read_capped(self.path, follow=True)
        return self._data

    def source_hash(self):
        from importlib.util import source_hash

        return source_hash(self.data())

    def compiled(self, level):
        """The code the import system compiles from the source at optimisation LEVEL."""
        if level not in self._code:
            self._code[level] = compile(self.data(), self.path, "exec", dont_inherit=True, optimize=level)
        return self._code[level]


def _pyc_fact(source, pyc, level, compared, known):
    """What the interpreter does with PYC for SOURCE at optimisation LEVEL: None when there is none
    or it would not load it (another interpreter's magic, a bad header, a stale timestamp);
    else a dict with its verdict: 'loads' (with the sha256 of the marshalled code after the header,
    'raw'; unless that is one of KNOWN, the digest of the code itself, 'code'; and with COMPARED
    whether that is the source's code, 'same'), 'stale' (hash-based bytecode of other source:
    unchecked-hash is loaded all the same, checked-hash whenever hash checks are off), 'broken'
    (no code in it: importing fails), 'irregular' (not a regular file) or 'unreadable'."""
    from importlib.util import MAGIC_NUMBER

    fact = {"pyc": pyc, "level": level, "mode": None, "verdict": "", "raw": None, "code": None, "same": None,
            "why": ""}
    try:
        found = os.lstat(pyc)
    except OSError:
        return None
    if not stat.S_ISREG(found.st_mode):
        fact.update(verdict="irregular", why=_kind(found.st_mode))
        return fact
    try:
        data = _read_capped(pyc)
    except OSError as exc:
        fact.update(verdict="unreadable", why=exc.strerror or str(exc))
        return fact
    flags = int.from_bytes(data[4:8], "little") if len(data) >= 16 else -1
    if data[:4] != MAGIC_NUMBER or flags < 0 or flags & ~(_HASH_BASED | _CHECK_SOURCE):
        return None
    if flags & _HASH_BASED:
        fact["mode"] = "checked-hash" if flags & _CHECK_SOURCE else "unchecked-hash"
        try:
            stale = data[8:16] != source.source_hash()
        except OSError as exc:
            fact.update(verdict="unreadable", why="its source is unreadable: %s" % (exc.strerror or exc))
            return fact
        if stale:
            fact.update(verdict="stale", why="hash of other source")
            return fact
    else:
        fact["mode"] = "timestamp"
        if (int.from_bytes(data[8:12], "little") != int(source.stat.st_mtime) & 0xFFFFFFFF
                or int.from_bytes(data[12:16], "little") != source.stat.st_size & 0xFFFFFFFF):
            return None
    fact.update(verdict="loads", raw=sha256_hex(data[16:]))
    if fact["raw"] in known and not compared:
        return fact
    import marshal

    try:
        code = marshal.loads(data[16:])
    except (ValueError, EOFError, TypeError):
        code = None
    if not isinstance(code, type(_anonymous.__code__)):
        fact.update(verdict="broken", why="holds no code object")
        return fact
    fact["code"] = code_digest(code)
    if compared:
        try:
            fact["same"] = code == source.compiled(level)
        except (OSError, SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
            fact["same"] = False
    return fact


def bytecode_facts(sources, compared=False, known=()):
    """For each source file path of SOURCES: the bytecode files this interpreter could load for
    it, at every optimisation level, each described by _pyc_fact; COMPARED: each loadable one is
    also compared with the code compiled from the source (costly); KNOWN: the sha256 of marshalled
    code bodies not to unmarshal (those apply wrote). A __pycache__ that is a symlink is not read
    through: any bytecode reached there is reported 'irregular'."""
    known = frozenset(known)
    try:
        from importlib.util import cache_from_source

        cache_from_source("x.py")
    except (ImportError, NotImplementedError):  # no bytecode cache (cache_tag None)
        return {path: [] for path in sources}
    answer = {}
    for path in sources:
        facts = answer[path] = []
        try:
            source = _Source(path)
        except OSError:
            continue  # no source: its digest check says why
        for level in (0, 1, 2):
            pyc = cache_from_source(path, optimization=level or "")
            cache = os.path.dirname(pyc)
            if os.path.islink(cache):
                if os.path.lexists(pyc):
                    facts.append({"pyc": pyc, "level": level, "mode": None, "verdict": "irregular", "raw": None,
                                  "code": None, "same": None, "why": "in a __pycache__ that is a symlink"})
                continue
            fact = _pyc_fact(source, pyc, level, compared, known)
            if fact is not None:
                facts.append(fact)
    return answer


def _bytecode_of(request, modules):
    """The bytecode_facts of each [module, relpath] pair of REQUEST, the module found through
    MODULES; in request order, None for a module not found."""
    found = []
    for module, relpath in request.get("bytecode") or []:
        location = modules.get(module)
        if location is None:
            found.append(None)
            continue
        path = os.path.join(os.path.dirname(location["module_dir"]), relpath)
        found.append(bytecode_facts([path], bool(request.get("compared")), request.get("known") or ())[path])
    return found


def _cache_tag():
    return getattr(sys.implementation, "cache_tag", None)


def _magic():
    from importlib.util import MAGIC_NUMBER

    return MAGIC_NUMBER.hex()


def describe(packages, paths=None, request=None, editable=None):
    """PACKAGES: [[distribution, module], ...]; PATHS: search these instead of sys.path. REQUEST
    may ask for the bytecode facts of [module, relpath] pairs ('bytecode'; 'compared' and 'known'
    as bytecode_facts takes them). EDITABLE: top-level module -> directory of editable installs
    found by a finder rather than on the path (see isolated_search_path)."""
    modules = {module: _module(module, paths, editable) for _, module in packages}
    described = {
        "python": sys.executable,
        "python_version": "%d.%d.%d" % sys.version_info[:3],
        "purelib": _purelib(),
        "distributions": {dist: _distribution(dist, paths) for dist, _ in packages},
        "modules": modules,
        "cache_tag": _cache_tag(),
        "magic": _magic(),
    }
    if request and request.get("bytecode"):
        described["bytecode"] = _bytecode_of(request, modules)
    return described


# The search path `site` would build, without running anything of the environment's (run with -I -S:
# no .pth import line, no sitecustomize or usercustomize, no PYTHON* variable, no user site).
# Hand-written after site.venv, site.addsitepackages and site.addpackage (3.8 to 3.13), because
# those execute the import lines of .pth files, which another user may have written.
def _venv_config(executable):
    """(venv directory, its pyvenv.cfg's include-system-site-packages is true) as site.venv finds
    them from EXECUTABLE: a pyvenv.cfg beside it or one directory up; None when there is none."""
    exe_dir = os.path.dirname(os.path.abspath(executable))
    prefix = os.path.dirname(exe_dir)
    for config in (os.path.join(exe_dir, "pyvenv.cfg"), os.path.join(prefix, "pyvenv.cfg")):
        if os.path.isfile(config):
            break
    else:
        return None
    system_site = "true"  # site.venv's default when the key is absent
    try:
        text = _read_capped(config, follow=True).decode("utf-8", "surrogateescape")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip().lower() == "include-system-site-packages":
            system_site = value.strip().lower()
    return prefix, system_site == "true"


def _pth_paths(sitedir, known, editable):
    """The existing directories (or archives) the plain path lines of SITEDIR's .pth files name, in
    the order site adds them. Lines starting with 'import' are never executed: one importing an
    editable finder module of SITEDIR adds what that module maps to EDITABLE (_finder_mapping)."""
    try:
        names = sorted(name for name in os.listdir(sitedir) if name.endswith(".pth"))
    except OSError:
        return []
    if sys.version_info >= (3, 13):
        names = [name for name in names if not name.startswith(".")]  # 3.13's site skips hidden ones
    added = []
    for name in names:
        try:
            text = _read_capped(os.path.join(sitedir, name), follow=True).decode("utf-8-sig", "surrogateescape")
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith(("import ", "import\t")):
                for module, directory in _finder_mapping(sitedir, line).items():
                    editable.setdefault(module, directory)
                continue
            if line.startswith("#") or not line.strip():
                continue
            path = os.path.abspath(os.path.join(sitedir, line.rstrip()))
            if os.path.normcase(path) not in known and os.path.exists(path):
                known.add(os.path.normcase(path))
                added.append(path)
    return added


def _finder_mapping(sitedir, line):
    """Top-level module -> package directory of the editable finder .pth LINE imports from SITEDIR,
    read from its source without running it: setuptools' __editable___*_finder.py (its MAPPING
    dict) or the editables project's redirector (its F.map_module(name, path) calls)."""
    import ast

    name = line.split(None, 1)[1].split(";")[0].split(",")[0].strip() if len(line.split(None, 1)) > 1 else ""
    if not name.isidentifier():
        return {}
    try:
        tree = ast.parse(_read_capped(os.path.join(sitedir, name + ".py")))
    except (OSError, SyntaxError, ValueError, RecursionError, MemoryError):
        return {}
    found = {}
    for node in tree.body:
        try:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None and any(
                    isinstance(t, ast.Name) and t.id == "MAPPING"
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target])):
                mapping = ast.literal_eval(node.value)
                found.update((k, v) for k, v in mapping.items() if isinstance(k, str) and isinstance(v, str))
            elif (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                  and isinstance(node.value.func, ast.Attribute) and node.value.func.attr == "map_module"
                  and len(node.value.args) == 2):
                module, path = (ast.literal_eval(arg) for arg in node.value.args)
                if isinstance(module, str) and isinstance(path, str) and os.path.basename(path) == "__init__.py":
                    found[module] = os.path.dirname(path)
        except (ValueError, TypeError, AttributeError, RecursionError, MemoryError):
            continue
    return dict((k, v) for k, v in found.items() if "." not in k and os.path.isabs(v))


def isolated_search_path():
    """sys.path as `site` would complete it for this interpreter (run with -S): its site-packages
    directories (a venv's, and the base installation's when its pyvenv.cfg includes them) and the
    plain path lines of their .pth files; and, as module -> directory, the editable installs their
    .pth import lines would add a finder for. A venv's sys.prefix is set as site.venv sets it, so
    sysconfig (purelib) answers as in a normal run."""
    import site

    prefixes = [sys.prefix, sys.exec_prefix]
    venv = _venv_config(sys.executable)
    if venv is not None:
        sys.prefix = sys.exec_prefix = venv[0]
        prefixes = [venv[0]] + (prefixes if venv[1] else [])
    paths, editable = list(sys.path), {}
    known = set(os.path.normcase(os.path.abspath(p)) for p in paths if os.path.exists(p))
    for sitedir in site.getsitepackages(list(dict.fromkeys(prefixes))):
        if not os.path.isdir(sitedir):
            continue
        sitedir = os.path.abspath(sitedir)
        if os.path.normcase(sitedir) not in known:
            known.add(os.path.normcase(sitedir))
            paths.append(sitedir)
        paths.extend(_pth_paths(sitedir, known, editable))
    return paths, editable


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    paths, editable = request.get("paths"), None
    if paths is None and sys.flags.no_site:
        # Given explicitly, not put on sys.path: an import of a module the standard library lacks
        # (e.g. _sha256 on 3.12) must not find one in a directory another user can write.
        paths, editable = isolated_search_path()
    json.dump(describe(request["packages"], paths, request, editable), sys.stdout)
