"""Emulate a read-only root filesystem (k8s ``readOnlyRootFilesystem: true`` with writable mounts, ``docker run
--read-only --tmpfs /tmp``) for every Python process that imports it (``PYTHONPATH``: the driver, the Ray workers it
starts): an audit hook (PEP 578) refuses, with EROFS as the kernel would, every write outside ``$RD_WRITABLE``
(``os.pathsep``-separated roots) and records it in ``$RD_VIOLATIONS/violations-<pid>.txt``; each hooked process
leaves ``active-<pid>.txt`` with its command line. Writes by native code (Ray's raylet, plasma) are not seen."""
import errno
import os
import sys

_ROOTS = tuple(os.path.join(os.path.realpath(r), "") for r in os.environ.get("RD_WRITABLE", "").split(os.pathsep) if r)
_LOG = os.environ.get("RD_VIOLATIONS")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_PATH_EVENTS = {"os.mkdir": 0, "os.remove": 0, "os.rmdir": 0, "os.utime": 0, "os.truncate": 0,
                "shutil.rmtree": 0, "os.rename": 1, "os.symlink": 1, "os.link": 1, "os.chmod": 0}
_DIR_FD_EVENTS = {"os.mkdir", "os.remove", "os.rmdir", "os.chmod"}
_busy = False


def _outside(path) -> str | None:
    if isinstance(path, int):
        return None
    p = os.fsdecode(path)
    full = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(p))), os.path.basename(p))
    return None if os.path.join(full, "").startswith(_ROOTS) else full


def _hook(event, args):
    global _busy
    if _busy:
        return
    if event == "open":
        path, mode, flags = args
        writes = (mode is not None and any(c in mode for c in "wax+")) or (mode is None and flags & _WRITE_FLAGS)
        if not writes:
            return
    elif event in _PATH_EVENTS:
        path = args[_PATH_EVENTS[event]]
        if event in _DIR_FD_EVENTS and args[-1] is not None and not isinstance(path, int) \
                and not os.path.isabs(os.fsdecode(path)):
            return  # relative to a dir_fd (inside shutil.rmtree, whose top path was checked)
    else:
        return
    full = _outside(path)
    if full is None:
        return
    if _LOG:
        _busy = True
        try:
            with open(f"{_LOG}/violations-{os.getpid()}.txt", "a") as f:
                f.write(f"{event}\t{full}\t{' '.join(sys.argv)[:200]}\n")
        finally:
            _busy = False
    raise OSError(errno.EROFS, "Read-only file system (emulated)", full)


if _ROOTS:
    if _LOG:
        with open(f"{_LOG}/active-{os.getpid()}.txt", "w") as _f:
            _f.write(" ".join(sys.argv))
    sys.addaudithook(_hook)
