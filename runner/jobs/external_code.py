"""A model's own training code, pinned on the host: fetch, check, snapshot. Nothing of it runs
here.

A parent may name an external family: a git repository (a local path or a URL the operator
allows in `code.allowed_origins`), a commit and the entry point inside it, beside which the
repository's card `forge-family.yaml` (trainers/family.py CARD_SCHEMA) declares the family.

- `parse_spec("REPO@COMMIT:ENTRYPOINT")`: what `forge models register --code` names.
- `resolve()`: at registration, a ref (branch, tag) or sha as the full sha it names now.
- `pin()`: for a plan, before any debit: the commit must exist and be reachable from a ref
  of the origin as fetched now (a force-pushed branch leaves it out: `commit_not_in_origin`),
  the entry point and card must be in it; then the commit's `git archive` snapshot, the card
  read from it as data, and the Family it declares (Family.from_card).

The repository is someone else's: it is fetched into a bare mirror this host made itself
(settings.cache_dir()/repos/<sha256(url)[:16]>.git), with git's system and global config,
hooks, prompts and the `ext::` transport off, no submodules and no working tree; git never
runs inside the origin's own folder but for the fetch's upload-pack, which reads no hooks
and honours no pack hook from a repository's config.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import re
import shutil
import stat
import tarfile
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from runner import settings
from runner.errors import CodePinError, TrainingFailed
from runner.jobs.archive import build_dir, compile_tree, extract_tar
from trainers import family as families

JOB_PATH = "/job/in/family"  # where the snapshot is bound in the jail (read-only)
SPEC = re.compile(r"^(?P<repo>.+)@(?P<commit>[A-Za-z0-9._/-]{1,200}):(?P<entry>[^:]{1,300})$")
SHA = re.compile(r"^[0-9a-f]{40}$")
_ENTRY = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}/){0,8}[A-Za-z_][A-Za-z0-9_]{0,99}\.py$")
REFS = "refs/origin/"  # the origin's heads and tags in the mirror, as of the last fetch
# Every git command on someone else's repository: no system or global config, no prompt, no
# hooks, only the file, https and ssh transports (never ext::), no submodules, no fsmonitor.
ENV = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_TERMINAL_PROMPT": "0",
       "GIT_ASKPASS": "/bin/false", "SSH_ASKPASS": "/bin/false"}
CONFIG = ("-c", "core.hooksPath=/dev/null", "-c", "protocol.allow=never",
          "-c", "protocol.file.allow=always", "-c", "protocol.https.allow=always",
          "-c", "protocol.ssh.allow=always", "-c", "protocol.ext.allow=never",
          "-c", "core.fsmonitor=false", "-c", "submodule.recurse=false",
          "-c", "fetch.recurseSubmodules=false", "-c", "core.sshCommand=ssh -oBatchMode=yes")
_locks: dict[str, threading.Lock] = {}
_locks_lock = threading.Lock()


@dataclass(frozen=True)
class ExternalCode:
    repo_url: str  # as registered (a local path resolved to an absolute one)
    sha: str
    entrypoint: str  # the entry point's path inside the repository
    snapshot: Path  # the commit's files (git archive), bound at JOB_PATH
    card: dict  # forge-family.yaml, as data
    family: families.Family

    def manifest_entry(self) -> dict:
        """The manifest's `family_code`: the card and the folder holding it, in the jail."""
        folder = PurePosixPath(JOB_PATH) / PurePosixPath(self.entrypoint).parent
        return {"path": str(folder), "card": self.card}

    def record(self) -> dict:
        return {"repo_url": self.repo_url, "commit_sha": self.sha,
                "entrypoint": self.entrypoint}


def parse_spec(spec: str) -> tuple[str, str, str]:
    """`REPO@COMMIT:ENTRYPOINT` -> (repo, commit or ref, entry point path)."""
    found = SPEC.match(spec) if isinstance(spec, str) else None
    if found is None or not _ENTRY.match(found["entry"]):
        raise CodePinError(f"--code {str(spec)[:200]!r} is not REPO@COMMIT:ENTRYPOINT",
                           reason="invalid_code", field="code",
                           fix="e.g. /srv/code/mymodel@main:train.py or "
                               "https://host/lab/model.git@4f1c2e9...:models/mine/train.py")
    return found["repo"], found["commit"], found["entry"]


def normal_origin(repo: str) -> str:
    """A local path (or file:// URL) as the absolute resolved path; a URL as given."""
    parsed = urlparse(repo)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme else repo)
        if not path.is_absolute():
            raise CodePinError(f"repository {repo!r} is a relative path", reason="invalid_code",
                               field="code",
                               fix="name the repository by its absolute path or a URL")
        return str(path.resolve())
    if re.search(r"/\.\.?(/|$)", parsed.path) or re.search(r"[\s\\]", repo):  # prefix tricks
        raise CodePinError(f"repository URL {repo[:200]!r} has . or .. segments or blanks",
                           reason="invalid_code", field="code",
                           fix="name the repository by its plain URL")
    return repo


def check_origin(repo: str, allowed: list[str]) -> str:
    """The normalised origin, if an entry of the operator's `code.allowed_origins` allows it:
    a path prefix (absolute, compared resolved, by whole components), a URL prefix, or an
    fnmatch glob. CodePinError origin_not_allowed otherwise (an empty list allows none)."""
    origin = normal_origin(repo)
    for entry in allowed or []:
        if not isinstance(entry, str) or not entry:
            continue
        if fnmatch.fnmatchcase(origin, entry):
            return origin
        if entry.startswith(("/", "file://")):  # a folder: itself and what lies under it
            folder = str(Path(urlparse(entry).path).resolve())
            if origin == folder or origin.startswith(folder.rstrip("/") + "/"):
                return origin
        elif origin.startswith(entry):  # a URL prefix (end it with / to mean a folder)
            return origin
    raise CodePinError(f"repository {origin!r} is not among this host's code.allowed_origins",
                       reason="origin_not_allowed", field="code.allowed_origins",
                       fix="the operator allows an origin in conf/ (code.allowed_origins); "
                           "a caller cannot")


def mirror_path(origin: str) -> Path:
    return settings.cache_dir() / "repos" / (
        hashlib.sha256(origin.encode()).hexdigest()[:16] + ".git")


def _lock(origin: str) -> threading.Lock:
    with _locks_lock:
        return _locks.setdefault(origin, threading.Lock())


def _git(mirror: Path, *args: str, binary: bool = False):
    """git on the mirror (never in the origin's folder), hardened (ENV, CONFIG)."""
    import git

    return git.Git(str(mirror)).execute(
        ["git", *CONFIG, "--git-dir", str(mirror), *args], env=ENV,
        stdout_as_string=not binary)


def fetch(origin: str) -> Path:
    """The origin's heads and tags, fetched now into this host's bare mirror of it (made
    here on first use), pruned: refs/origin/* is the origin as it is now."""
    import git

    mirror = mirror_path(origin)
    with _lock(origin):
        if not (mirror / "HEAD").is_file():
            mirror.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".init-", dir=mirror.parent))
            git.Git(str(tmp)).execute(["git", *CONFIG, "init", "-q", "--bare", str(tmp)],
                                      env=ENV)
            try:
                os.replace(tmp, mirror)
            except OSError:  # another process made it first
                shutil.rmtree(tmp, ignore_errors=True)
        url = origin if urlparse(origin).scheme else "file://" + origin
        try:
            _git(mirror, "fetch", "--quiet", "--prune", "--no-tags",
                 "--no-recurse-submodules", url, f"+refs/heads/*:{REFS}heads/*",
                 f"+refs/tags/*:{REFS}tags/*")
        except git.GitCommandError as exc:
            raise CodePinError(f"could not fetch {origin}: {_stderr(exc)}",
                               reason="origin_unreachable", field="code",
                               fix="check that the repository exists and this host can read "
                                   "it") from exc
    return mirror


def _stderr(exc) -> str:
    lines = (getattr(exc, "stderr", "") or str(exc)).strip().splitlines()
    return lines[-1][:300] if lines else "git failed"


def _commit(mirror: Path, name: str) -> str | None:
    import git

    try:
        return _git(mirror, "rev-parse", "--verify", "--quiet", "--end-of-options",
                    f"{name}^{{commit}}").strip()
    except git.GitCommandError:
        return None


def resolve(origin: str, commit: str) -> str:
    """At registration: the full sha `commit` (a sha, or a branch or tag of the origin) names
    in the origin now. CodePinError unknown_commit when it names none."""
    mirror = fetch(origin)
    for name in ((commit,) if SHA.match(commit) else
                 (f"{REFS}heads/{commit}", f"{REFS}tags/{commit}", commit)):
        sha = _commit(mirror, name)
        if sha is not None and _reachable(mirror, sha):
            return sha
    raise CodePinError(f"{commit!r} names no commit of {origin} (its branches and tags as "
                       "fetched now)", reason="unknown_commit", field="code.commit",
                       fix="pass a sha, branch or tag of that repository")


def _reachable(mirror: Path, sha: str) -> bool:
    """Whether a head or tag of the origin, as fetched now, holds the commit."""
    return bool(_git(mirror, "for-each-ref", "--contains", sha, "--format=%(refname)",
                     REFS).strip())


def _tree_entry(mirror: Path, sha: str, path: str) -> str | None:
    """The mode of `path` in the commit (100644, 100755, 120000 a link, ...), or None."""
    line = _git(mirror, "ls-tree", "--full-tree", sha, "--", path).strip()
    return line.split(" ", 1)[0] if line else None


def pin(origin: str, sha: str, entrypoint: str, allowed: list[str]) -> ExternalCode:
    """The registered code, checked against the origin as it is now and snapshotted (see the
    module's docstring). Every refusal is a CodePinError naming its reason."""
    origin = check_origin(origin, allowed)
    if not (isinstance(sha, str) and SHA.match(sha)) or not _ENTRY.match(entrypoint or ""):
        raise CodePinError(f"the registered code {sha!r}:{entrypoint!r} is not a full sha and "
                           "an entry point", reason="invalid_code", field="code",
                           fix="register the parent again with --code REPO@COMMIT:ENTRYPOINT")
    mirror = fetch(origin)
    if _commit(mirror, sha) != sha:
        raise CodePinError(f"commit {sha} is not in {origin}", reason="unknown_commit",
                           field="code.commit",
                           fix="register the parent again with a commit of that repository")
    if not _reachable(mirror, sha):
        raise CodePinError(f"commit {sha} is no longer reachable from a branch or tag of "
                           f"{origin} (a force-push or rewrite moved them)",
                           reason="commit_not_in_origin", field="code.commit",
                           fix="push the commit back to a branch or tag, or register the "
                               "parent again with the code as it is now")
    card_path = str(PurePosixPath(entrypoint).parent / families.CARD_FILE).removeprefix("./")
    for path in (entrypoint, card_path):
        if _tree_entry(mirror, sha, path) not in ("100644", "100755"):
            raise CodePinError(f"commit {sha[:12]} of {origin} has no file {path}",
                               reason="missing_entrypoint", field="code.entrypoint",
                               fix=f"commit {path} (a regular file, not a link) and register "
                                   "that commit")
    snapshot = _snapshot(mirror, sha)
    card = read_card(snapshot / card_path)
    try:
        fam = families.Family.from_card(card, snapshot / PurePosixPath(entrypoint).parent)
    except families.CardError as exc:
        raise CodePinError(f"{origin}@{sha[:12]}: {exc}", reason="invalid_card",
                           field=f"code.card.{exc.field}",
                           fix="fix forge-family.yaml (docs/guides/own-code.md)") from None
    if card["entry_point"] != PurePosixPath(entrypoint).name:
        raise CodePinError(f"the card names entry point {card['entry_point']!r}, the parent "
                           f"{entrypoint!r}", reason="missing_entrypoint",
                           field="code.entrypoint",
                           fix="register the entry point the card beside it names")
    return ExternalCode(repo_url=origin, sha=sha, entrypoint=entrypoint, snapshot=snapshot,
                        card=card, family=fam)


def _snapshot(mirror: Path, sha: str) -> Path:
    """The commit's files: `git archive` from the mirror into a temporary folder, compiled
    to bytecode (archive.compile_tree: parsing only, none of it runs on the host), renamed
    into place (as codepin.snapshot), cached by sha."""
    def fill(folder: Path) -> None:
        data = _git(mirror, "archive", "--format=tar", sha, binary=True)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            extract_tar(tar, folder)
        compile_tree(folder)

    return build_dir(settings.cache_dir() / "external-code" / sha, fill)


def read_card(path: Path) -> object:
    """forge-family.yaml as data: a regular file (not a link, not a FIFO) under
    MAX_CARD_BYTES, parsed with yaml.safe_load (no tags, no objects)."""
    import yaml

    def refuse(why: str) -> CodePinError:
        return CodePinError(f"{families.CARD_FILE}: {why}", reason="invalid_card",
                            field="code.card",
                            fix="fix forge-family.yaml (docs/guides/own-code.md)")

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise refuse(f"cannot be read: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > families.MAX_CARD_BYTES:
            raise refuse(f"is not a regular file under {families.MAX_CARD_BYTES >> 10} KiB")
        raw = f.read(families.MAX_CARD_BYTES + 1)
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise refuse(f"is not valid YAML: {str(exc)[:200]}") from None


def check_checkpoint(fam: families.Family, folder: Path) -> None:
    """A finished job's checkpoint (already handed back: regular files and folders only) holds
    every file its card lists; TrainingFailed invalid_checkpoint names the first it lacks."""
    try:
        fam.inspect(folder)
    except families.CheckpointError as exc:
        raise TrainingFailed(f"the job's checkpoint is not a {fam.name} checkpoint: {exc}",
                             reason="invalid_checkpoint", field=f"checkpoint.{exc.field}",
                             fix=f"the entry point must write {', '.join(fam.checkpoint_files)} "
                                 "as regular files in output_dir/checkpoint") from None


def of_parent(parent: dict) -> dict | None:
    """The external code a parent's record names ({repo_url, commit_sha, entrypoint}), or
    None for a parent of a built-in family."""
    code = (parent.get("metadata") or {}).get("code")
    return code if isinstance(code, dict) else None
