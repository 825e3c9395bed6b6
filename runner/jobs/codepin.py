"""Pin the code a job runs: HEAD commit, remote, branch and dirty state (GitPython).

The sandbox runs exactly the pinned commit. A dirty tree (uncommitted changes to tracked
files) is refused unless the caller allows it; then the job runs the tracked files as they
are, and `diff_sha256` is the sha256 of the one patch (`diff_patch`) that turns the commit
into them, so two runs from different dirty trees never look alike. Untracked files never
reach a job: `allow_dirty` is a caller's key, and the operator's checkout holds untracked
secrets (.env, conf/local/) that a job could print to its log.
`pin_commit()` pins a named earlier commit instead of HEAD: a sweep pins once and every job
runs that commit, whatever is committed while the sweep runs.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from runner import settings
from runner.errors import CodePinError
from runner.jobs.archive import build_dir, compile_tree, extract_tar

_repos: dict[str, tuple[object, threading.Lock]] = {}
_SHA = re.compile(r"^[0-9a-f]{7,40}$")
_lock = threading.Lock()
JAIL_PACKAGE = "trainers"  # what the jail imports from the snapshot (trainers.entrypoint)


@dataclass(frozen=True)
class CodePin:
    sha: str
    repo_url: str  # remote origin URL, or the repository path when there is no origin
    dirty: bool
    diff_sha256: str | None
    branch: str | None  # None on a detached HEAD
    repo_path: str

    def to_dict(self) -> dict:
        return asdict(self)


def default_repo_path() -> Path:
    return settings.code_repo()


@contextmanager
def _repo(path: Path) -> Iterator:
    """The GitPython Repo for `path`, cached per process (opening one reads config files),
    held by one thread at a time: a Repo is not thread-safe (its persistent `git cat-file`
    process answers whichever thread reads first, and the other waits on the pipe for
    good), and the MCP server plans its callers' jobs in many threads."""
    import git

    key = str(path.resolve())
    with _lock:
        entry = _repos.get(key)
        if entry is None:
            try:
                entry = (git.Repo(key, search_parent_directories=True), threading.Lock())
            except (git.InvalidGitRepositoryError, git.NoSuchPathError) as exc:
                raise CodePinError(
                    f"{key} is not inside a git repository", field="repo_path",
                    reason="not_a_git_repo",
                    fix="run from a git checkout of the training code (git init && git commit), "
                        "or set FORGE_CODE_REPO") from exc
            _repos[key] = entry
    repo, in_use = entry
    with in_use:
        yield repo


def pin_code(repo_path: str | Path | None = None) -> CodePin:
    """HEAD sha, origin URL (or repo path), branch, dirty flag and a digest of the changes."""
    with _repo(Path(repo_path) if repo_path is not None else default_repo_path()) as repo:
        return _pin_head(repo)


def _pin_head(repo) -> CodePin:
    import git

    root = repo.working_tree_dir or repo.git_dir
    try:
        sha = repo.head.commit.hexsha
    except ValueError as exc:  # unborn HEAD: `git init` without a commit
        raise CodePinError(f"{root} has no commit yet", field="repo_path", reason="no_commit",
                           fix="commit the training code first (git add -A && git commit)") from exc
    try:  # untracked files are not part of the code that runs (see snapshot)
        patch = _tracked_diff(repo)
        diff_sha256 = hashlib.sha256(patch).hexdigest() if patch else None
    except git.GitCommandError as exc:
        raise CodePinError(f"git failed in {root}: {exc.stderr.strip() or exc}",
                           field="repo_path", reason="git_failed",
                           fix="check the repository with `git status`") from exc
    try:
        branch = repo.active_branch.name
    except TypeError:  # detached HEAD
        branch = None
    return CodePin(sha=sha, repo_url=_origin_url(repo, root), dirty=bool(patch),
                   diff_sha256=diff_sha256,
                   branch=branch, repo_path=str(root))


def pin_commit(sha: str, repo_path: str | Path | None = None) -> CodePin:
    """A clean pin of commit `sha` (full or abbreviated hex) of the repository."""
    import git

    if not isinstance(sha, str) or not _SHA.match(sha):
        raise CodePinError(f"code_commit must be a commit sha (7 to 40 lowercase hex digits), "
                           f"got {sha!r}", field="code_commit", reason="bad_commit",
                           fix="pass a sha that `git log --format=%H` prints, or leave "
                               "code_commit out to run HEAD")
    with _repo(Path(repo_path) if repo_path is not None else default_repo_path()) as repo:
        root = repo.working_tree_dir or repo.git_dir
        try:  # rev-parse --verify: the object exists and is a commit (repo.commit does not)
            full = repo.git.rev_parse("--verify", "--quiet", f"{sha}^{{commit}}")
        except git.GitCommandError as exc:
            raise CodePinError(f"commit {sha} is not in {root}", field="code_commit",
                               reason="unknown_commit",
                               fix="pass a sha that `git log --format=%H` prints in that "
                                   "repository, or leave code_commit out to run HEAD") from exc
        return CodePin(sha=full.strip(), repo_url=_origin_url(repo, root), dirty=False,
                       diff_sha256=None, branch=None, repo_path=str(root))


def _origin_url(repo, root) -> str:
    """The remote origin's URL, or the repository path when there is none."""
    reader = repo.config_reader()  # plain file reads, no subprocess
    return reader.get_value('remote "origin"', "url", default="") or str(root)


def dirty_error(pin: CodePin) -> CodePinError:
    """The refusal for a dirty tree without allow_dirty."""
    return CodePinError(f"the working tree {pin.repo_path} has uncommitted changes",
                        field="allow_dirty", reason="dirty_tree", diff_sha256=pin.diff_sha256,
                        fix="commit your changes (the sandbox runs the pinned commit), "
                            "or pass allow_dirty=True")


def _tracked_diff(repo) -> bytes:
    """The working tree's changes to tracked files (staged or not) against HEAD, as a
    `git apply`-able binary patch; b"" for a clean tree."""
    patch = repo.git.diff("HEAD", "--binary", stdout_as_string=False)
    return patch.rstrip(b"\n") + b"\n" if patch else b""


def diff_patch(pin: CodePin) -> bytes:
    """What a dirty tree runs on top of its pinned commit, as one `git apply`-able patch:
    the changes to tracked files. Its sha256 is `pin.diff_sha256` while the tree is as pinned."""
    with _repo(Path(pin.repo_path)) as repo:
        return _tracked_diff(repo)


def snapshot_path(pin: CodePin, root: str | Path) -> Path:
    """Where `snapshot(pin, root)` puts (or finds) the pinned code; builds nothing."""
    name = pin.sha if not pin.dirty else f"{pin.sha}-{(pin.diff_sha256 or 'dirty')[:16]}"
    return Path(root) / name


def snapshot(pin: CodePin, root: str | Path) -> Path:
    """A directory holding exactly the pinned code, for the sandbox to mount read-only.

    Clean pin: `git archive` of the commit. Dirty pin (allow_dirty): the tracked files as they
    are now, never an untracked one. Cached under `root` by sha (+ diff digest); built in a
    temporary directory and renamed into place, so concurrent launches never see half a copy.
    The package the jail runs (`trainers/`) is compiled to bytecode there, once per snapshot
    (archive.compile_tree), so that no job compiles it again.
    """

    def fill(folder: Path) -> None:
        copy(folder)
        if (folder / JAIL_PACKAGE).is_dir():
            compile_tree(folder / JAIL_PACKAGE)

    def copy(folder: Path) -> None:  # git under the Repo's lock; the files written after
        if not pin.dirty:
            with _repo(Path(pin.repo_path)) as repo:
                data = repo.git.archive(pin.sha, format="tar", stdout_as_string=False)
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                extract_tar(tar, folder)
            return
        with _repo(Path(pin.repo_path)) as repo:
            listed = repo.git.ls_files("-z", "--cached")  # tracked only: see the docstring
        for rel in filter(None, listed.split("\0")):
            src = Path(pin.repo_path) / rel
            if src.is_file() and not src.is_symlink():
                target = folder / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)

    return build_dir(snapshot_path(pin, root), fill)
