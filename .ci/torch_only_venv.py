"""python .ci/torch_only_venv.py VENV: a fresh virtual environment that holds torch and its dependencies alone.

Installing a CUDA torch into a venv copies about 5.5 GB, so the venv links this interpreter's own torch
distribution instead: every distribution that `torch` requires, recursively (markers and extras evaluated), and
pip to install the rest. Each is linked with its .dist-info, so pip sees it installed; RECORD is left out of the
linked .dist-info, so pip refuses to uninstall or upgrade one (which would delete the files it links to) rather
than reach into this environment (so never --force-reinstall or --ignore-installed one of them there: pip would
write through the links). Nothing else of this environment is visible: no .pth, no system site-packages.
Standard library only, plus `packaging` (or pip's own copy) for the requirement markers.
"""
import argparse
import importlib.metadata as md
import os
import subprocess
import sys
import sysconfig

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pip vendors it
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name


def closure(roots, path):
    """{canonical name: Distribution} of `roots` and everything they require here, with extras followed."""
    dists = {canonicalize_name(d.metadata["Name"]): d for d in md.distributions(path=path)}
    found, extras, todo = {}, {}, [(canonicalize_name(r), frozenset()) for r in roots]
    while todo:
        name, want = todo.pop()
        if name in found and want <= extras[name]:
            continue
        if name not in dists:
            sys.exit(f"error: {name} is required but not installed in {path[0]}")
        found[name], extras[name] = dists[name], extras.get(name, frozenset()) | want
        for req in map(Requirement, dists[name].requires or []):
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras[name] or {""}):
                todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return found, dists


def owned_paths(dist):
    """The dist's files relative to site-packages, its .dist-info and anything outside site-packages left out."""
    info = os.path.basename(str(dist._path))  # noqa: SLF001 (the only way to the folder's own name)
    return {str(f) for f in dist.files or [] if not str(f).startswith(("..", info + "/")) and "__pycache__" not in str(f)}


def link_tree(rel, site, venv_site, ours, theirs):
    """Link `rel` whole where no distribution outside ours has files under it (a shared namespace such as
    nvidia/ or cuda/ is entered instead and its entries linked one by one)."""
    below = rel + "/"
    if not any(p == rel or p.startswith(below) for p in theirs):
        os.symlink(os.path.join(site, rel), os.path.join(venv_site, rel))
        return
    os.makedirs(os.path.join(venv_site, rel), exist_ok=True)
    for child in sorted({rel + "/" + p[len(below):].split("/")[0] for p in ours if p.startswith(below)}):
        link_tree(child, site, venv_site, ours, theirs)


def build(venv, roots=("torch", "pip")):
    site = sysconfig.get_paths()["purelib"]
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    venv_site = subprocess.run([os.path.join(venv, "bin", "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip()
    found, dists = closure(roots, [site])
    ours = set().union(*(owned_paths(d) for d in found.values()))
    theirs = set().union(*(owned_paths(d) for n, d in dists.items() if n not in found)) - ours
    for top in sorted({p.split("/")[0] for p in ours}):
        link_tree(top, site, venv_site, ours, theirs)
    for d in found.values():
        info = str(d._path)  # noqa: SLF001
        target = os.path.join(venv_site, os.path.basename(info))
        os.makedirs(target)
        for f in os.listdir(info):
            if f != "RECORD":
                os.symlink(os.path.join(info, f), os.path.join(target, f))
    return sorted(found)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("venv", help="folder to create (must not exist)")
    args = p.parse_args()
    if os.path.exists(args.venv):
        sys.exit(f"error: {args.venv} exists")
    names = build(args.venv)
    print(f"{args.venv}: linked {len(names)} distributions: {' '.join(names)}")


if __name__ == "__main__":
    main()
