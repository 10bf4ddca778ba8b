"""The deploy toolkit's helper on the server: small, idempotent file operations on the release
layout, each one call. Python 3.8+ standard library only, because it runs with the server's
python3 before any venv exists. Every subcommand prints one JSON object; an error exits 2 with
one line on stderr.

Layout (DEPLOY_PATH):
  releases/<id>/      unpacked package; .venv -> ../../shared/venvs/<requirements hash>
  shared/             venvs/; instance and uploads are links (the deploy user's) to the
                      app's folders in /var/lib/<service>, which only root can replace (the
                      app's environment is /etc/<service>/app.env: systemd reads it as root)
  packages/           uploaded packages
  current, next       symlinks to releases/<id> (next: the release being deployed)
  candidate           symlink to the release a preflight boots beside the live one; removed
                      at the switch (conf/gunicorn.conf.py)
  good-releases       ids that went live, oldest first (rollback walks it backwards)
  failed-releases     ids that failed verification (ship refuses them unless forced)
  deploy-log.jsonl    one line per deploy or rollback
  .deploy-lock/       held while a deploy runs (info.json says by whom)
"""

import json
import os
import sys

# Every other module is imported by the commands that need it: every call is a fresh python3
# (run with -I -S: no site-packages to scan), and imports are most of its start-up time.

DATABASE_SUFFIXES = (".sqlite3", ".sqlite", ".db")
SHARED_LINKS = ("instance", "uploads")
# Answers a starting or restarting server gives before it is ready; any other is final.
RETRYABLE_HTTP = (429, 502, 503, 504)


class Refusal(Exception):
    """What the user must hear: printed as `error: ...`, exit status 2."""


NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"  # as scripts/settings.py: never ".", ".." or a path


def release_name(value):
    import re
    if not re.fullmatch(NAME, value):
        raise Refusal("%r is not a release name (letters, digits, '.', '_', '-'; `doit status` "
                      "lists them)" % value)
    return value


def backup_dir_of(value):
    """A backup folder given as BACKUP_PATH/<name>: the name must be a backup name."""
    import re
    parent, name = os.path.split(value)
    if not re.fullmatch(NAME, name) or ".." in parent.split("/"):
        raise Refusal("%r is not a backup name (`doit backups` lists them)" % name)
    return value


def out(**values):
    print(json.dumps(values, sort_keys=True))


class _captured:
    """What the commands called inside print, as a dict: one call runs several steps."""

    def __enter__(self):
        import contextlib
        import io
        self.answer = {}
        self._buffer = io.StringIO()
        self._redirect = contextlib.redirect_stdout(self._buffer)
        self._redirect.__enter__()
        return self.answer

    def __exit__(self, *exc):
        self._redirect.__exit__(*exc)
        text = self._buffer.getvalue().strip()
        if text:
            self.answer.update(json.loads(text.splitlines()[-1]))


def rmtree(folder, ignore_errors=False):
    import shutil
    shutil.rmtree(folder, ignore_errors=ignore_errors)


def _sha256(data=b""):
    import hashlib
    return hashlib.sha256(data)


def path(root, *parts):
    return os.path.join(root, *parts)


def release_id_of(link):
    try:
        return os.path.basename(os.readlink(link))
    except OSError:
        return None


def read_ids(root, name):
    """Release ids in a list file (good-releases, failed-releases), oldest first."""
    try:
        with open(path(root, name)) as stream:
            return [line.strip() for line in stream if line.strip()]
    except FileNotFoundError:
        return []


def write_ids(root, name, ids):
    write_atomically(path(root, name), "".join(item + "\n" for item in ids))


def read_good(root):
    return read_ids(root, "good-releases")


def write_atomically(target, text, mode=0o644):
    staged = target + ".new"
    with open(staged, "w") as stream:
        stream.write(text)
    os.chmod(staged, mode)
    os.replace(staged, target)


def link_atomically(link, destination):
    """ln -sfn, but atomic: a reader sees the old link or the new one, never none."""
    staged = link + ".new"
    if os.path.lexists(staged):
        os.unlink(staged)
    os.symlink(destination, staged)
    os.replace(staged, link)


def sha256_of(file_name):
    digest = _sha256()
    with open(file_name, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- state ------------------------------------------------------------------------------------
def cmd_probe(root, health_url="", release=""):
    """Everything a deploy, check or status needs to know, in one round trip. With a health
    url and a release: whether that release is current and answers healthy there (`serving`),
    which is all a deploy of the same package needs to know."""
    lock = None
    try:
        with open(path(root, ".deploy-lock", "info.json")) as stream:
            lock = json.load(stream)
    except FileNotFoundError:
        lock = {"holder": "unknown (no info.json)"} if os.path.isdir(
            path(root, ".deploy-lock")) else None
    except ValueError:
        lock = {"holder": "unknown (unreadable info.json)"}
    releases = sorted(name for name in os.listdir(path(root, "releases"))
                      if not name.endswith(".partial")) if os.path.isdir(
        path(root, "releases")) else []
    libc = os.confstr("CS_GNU_LIBC_VERSION") or ""  # "glibc 2.41"
    import importlib.util
    current = release_id_of(path(root, "current"))
    serving = False
    if health_url and release and current == release:
        try:
            serving = wait_healthy(health_url, release, 1) in (None, release)
        except Refusal:
            pass
    out(current=current, good=read_good(root), lock=lock, serving=serving,
        failed=read_ids(root, "failed-releases"),
        releases=releases, python="%d.%d" % sys.version_info[:2], machine=os.uname().machine,
        glibc=libc.split()[-1] if libc.startswith("glibc ") else "",
        # Debian and Ubuntu keep ensurepip, which `python3 -m venv` needs, in python3-venv.
        venv=importlib.util.find_spec("ensurepip") is not None,
        layout=os.path.isdir(path(root, "releases")) and os.path.isdir(path(root, "shared")))


def cmd_plan(root, release, venv_key, env_file, migrations_json="{}", migrate_command=None):
    """What a dry run needs beyond probe to say what each deploy step would do. MIGRATIONS_JSON:
    {MIGRATIONS_PATHS item: {file: sha256}} from the package's manifest (see set-next)."""
    env_sha256 = env_sha256_without_secret = None
    if os.path.isfile(env_file):
        with open(env_file, "rb") as stream:
            content = stream.read()
        env_sha256 = _sha256(content).hexdigest()
        env_sha256_without_secret = _sha256(
            without_secret_key(content.decode(errors="replace")).encode()).hexdigest()
    out(unpacked=os.path.isfile(path(root, "releases", release, ".unpacked")),
        venv_ready=os.path.isfile(path(root, "shared", "venvs", venv_key, ".complete")),
        databases=_databases(root), env_sha256=env_sha256,
        env_sha256_without_secret=env_sha256_without_secret,
        migrations=migrations_against_live(root, release, json.loads(migrations_json),
                                           migrate_command))


def cmd_lock(root, info_json, package="", sha256=""):
    """mkdir is atomic: exactly one deploy gets the lock. With a package name and its sha256,
    also whether that package is on the server already (one round trip for both)."""
    if package:
        file_name = path(root, "packages", package)
        present = os.path.isfile(file_name) and sha256_of(file_name) == sha256
        with _captured() as answer:
            cmd_lock(root, info_json)
        out(present=present, **answer)
        return
    lock_dir = path(root, ".deploy-lock")
    try:
        os.mkdir(lock_dir)
    except FileExistsError:
        try:
            with open(path(lock_dir, "info.json")) as stream:
                holder = json.load(stream)
        except (OSError, ValueError):
            holder = {"holder": "unknown"}
        out(taken=False, holder=holder)
        return
    write_atomically(path(lock_dir, "info.json"), info_json)
    out(taken=True)


def cmd_unlock(root, token=""):
    """Release the lock; with a token, only the lock that token took."""
    lock_dir = path(root, ".deploy-lock")
    if not os.path.isdir(lock_dir):
        out(released=False, holder=None)
        return
    try:
        with open(path(lock_dir, "info.json")) as stream:
            holder = json.load(stream)
    except (OSError, ValueError):
        holder = {}
    if token and holder.get("token") != token:
        out(released=False, holder=holder)
        return
    rmtree(lock_dir)
    out(released=True, holder=holder)


# -- shipping ---------------------------------------------------------------------------------
def cmd_has_package(root, name, sha256):
    file_name = path(root, "packages", name)
    out(present=os.path.isfile(file_name) and sha256_of(file_name) == sha256)


def cmd_accept_package(root, name, sha256):
    """The upload went to NAME.partial; keep it only if its sha256 is the expected one."""
    partial = path(root, "packages", name + ".partial")
    actual = sha256_of(partial)
    if actual != sha256:
        os.unlink(partial)
        raise Refusal("uploaded package %s has sha256 %s, expected %s; the upload was damaged, "
                      "deploy again" % (name, actual[:12], sha256[:12]))
    os.replace(partial, path(root, "packages", name))
    out(accepted=True)


def _safe_members(tar):
    for member in tar.getmembers():
        parts = member.name.split("/")
        if member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
            raise Refusal("package holds an unsafe entry %r; refusing to unpack it" % member.name)
        yield member


def cmd_unpack(root, name, release):
    release = release_name(release)
    import compileall
    import re
    import tarfile
    release_dir = path(root, "releases", release)
    if os.path.isfile(path(release_dir, ".unpacked")):
        out(changed=False)
        return
    partial = release_dir + ".partial"
    rmtree(partial, ignore_errors=True)
    if os.path.isdir(release_dir):  # left by an interrupted deploy: start it again
        rmtree(release_dir)
    os.makedirs(partial)
    with tarfile.open(path(root, "packages", name)) as tar:
        tar.extractall(partial, members=list(_safe_members(tar)))
    with open(path(partial, "manifest.json")) as stream:
        if json.load(stream)["release_id"] != release:
            raise Refusal("package %s does not hold release %s" % (name, release))
    # Bytecode now, as the deploy user: the app user cannot write into a release.
    compileall.compile_dir(partial, quiet=1, rx=re.compile(r"/wheels/"))
    open(path(partial, ".unpacked"), "w").close()
    os.replace(partial, release_dir)
    out(changed=True)


def cmd_prepare(root, release, package, sha256, uploaded_package, env_file, uploaded_env,
                migrations_paths, migrate_command, backup_root, keep, keep_days, health_path=None):
    """Everything from the upload to the backup in one call: accept the uploaded package
    (when UPLOADED_PACKAGE), unpack, venv, shared links and the app's environment, `next`;
    then, when no migration will run (no MIGRATE_COMMAND, or MIGRATIONS_PATHS unchanged), the
    backup (the migrate step takes its own, under the write gate). Answers each step's answer
    and seconds, in order; a step that fails is named (`failed`, `error`), later ones do not
    run. HEALTH_PATH is kept with the release (see set-next)."""
    import time
    steps = [("unpack", lambda: cmd_unpack(root, package, release)),
             ("venv", lambda: cmd_venv(root, release)),
             ("shared", lambda: cmd_link_shared(root, release, env_file, uploaded_env)),
             ("next", lambda: cmd_set_next(root, release, migrations_paths, migrate_command,
                                           health_path))]
    if uploaded_package:
        steps.insert(0, ("accept", lambda: cmd_accept_package(root, package, sha256)))
    answers = {}
    backup = ("backup", lambda: cmd_backup(root, backup_root, release, keep, keep_days))
    while steps:
        name, step = steps.pop(0)
        started = time.monotonic()
        try:
            with _captured() as answer:
                step()
        except Refusal as refusal:
            out(steps=answers, failed=name, error=str(refusal))
            return
        except Exception as error:  # noqa: BLE001 - named as main() names it
            out(steps=answers, failed=name, error="%s: %s: %s" % (name, type(error).__name__,
                                                                   error))
            return
        answers[name] = dict(answer, seconds=round(time.monotonic() - started, 3))
        if name == "next" and (not migrate_command or answer.get("migrations_unchanged")):
            steps.append(backup)
    out(steps=answers)


def requirements_key(manifest, python):
    """The shared venv a release uses: its requirements, wheels and the server's Python. A dry
    run computes it from the local package's manifest."""
    wheels = sorted(entry["sha256"] for entry in manifest.get("wheels", []))
    text = manifest["requirements_sha256"] + "|" + python + "|" + ",".join(wheels)
    return _sha256(text.encode()).hexdigest()[:16]


def _requirements_hash(release_dir, python):
    with open(path(release_dir, "manifest.json")) as stream:
        return requirements_key(json.load(stream), python)


def cmd_venv(root, release):
    """A venv per requirements (and wheels): a code-only release reuses its predecessor's."""
    release = release_name(release)
    import subprocess
    release_dir = path(root, "releases", release)
    python = "%d.%d" % sys.version_info[:2]
    key = _requirements_hash(release_dir, python)
    venv_dir = path(root, "shared", "venvs", key)
    changed = False
    if not os.path.isfile(path(venv_dir, ".complete")):
        # venvs are not relocatable: build in place, and only a finished one gets .complete.
        rmtree(venv_dir, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", venv_dir], check=True)
        result = subprocess.run(
            [path(venv_dir, "bin", "pip"), "install", "--quiet", "--no-index",
             "--disable-pip-version-check", "--find-links", path(release_dir, "wheels"),
             "-r", path(release_dir, "requirements.txt")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
        if result.returncode != 0:
            rmtree(venv_dir, ignore_errors=True)
            last = (result.stdout.strip().splitlines() or ["no output"])[-1]
            raise Refusal("installing the wheels failed: %s" % last)
        open(path(venv_dir, ".complete"), "w").close()
        changed = True
    link = path(release_dir, ".venv")
    wanted = path("..", "..", "shared", "venvs", key)
    if (os.readlink(link) if os.path.islink(link) else None) != wanted:
        link_atomically(link, wanted)
    out(changed=changed, venv=key)


def with_secret_key(upload, current, new_key=None):
    """The uploaded environment as the server keeps it: an upload that names no SECRET_KEY
    keeps the server's one (or gets a random one), so an APP_ENV_FILE holding only the app's
    own settings never drops the key that signs its sessions."""
    import re
    line = re.compile(r"^[ \t]*(?:export[ \t]+)?SECRET_KEY[ \t]*=")
    if any(line.match(entry) for entry in upload.splitlines()):
        return upload
    kept = [entry for entry in current.splitlines() if line.match(entry)]
    if not kept:
        import secrets
        kept = ["SECRET_KEY=%s" % (new_key or secrets.token_hex(32))]
    return upload + ("\n" if upload and not upload.endswith("\n") else "") + kept[-1] + "\n"


def without_secret_key(text):
    """TEXT minus its SECRET_KEY lines: what a dry run compares an upload without one with."""
    import re
    line = re.compile(r"^[ \t]*(?:export[ \t]+)?SECRET_KEY[ \t]*=")
    return "".join(entry for entry in text.splitlines(True) if not line.match(entry))


def cmd_link_shared(root, release, env_file, uploaded=""):
    """instance/ and uploads/ of the release point into shared/. env_file (systemd reads it as
    root) is the deploy user's file in a folder only root writes: it is written in place, never
    replaced, and a first deploy puts a random SECRET_KEY in it. With `uploaded`, the file
    shared/<uploaded> (written privately by the deploy: `.env.upload-<token>`, or
    `.env.upload` as older toolkits name it) is its new content."""
    release = release_name(release)
    import secrets
    release_dir = path(root, "releases", release)
    changed = False
    for name in SHARED_LINKS:
        link = path(release_dir, name)
        wanted = path("..", "..", "shared", name)
        if not (os.path.islink(link) and os.readlink(link) == wanted):
            if os.path.isdir(link) and not os.path.islink(link):
                rmtree(link)
            link_atomically(link, wanted)
            changed = True
    try:
        descriptor = os.open(env_file, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        raise Refusal("the app's environment file %s is missing; run `doit setup` (it creates "
                      "it)" % env_file) from None
    with open(descriptor, "r+") as stream:
        current = stream.read()
        if uploaded:
            import re
            name = uploaded if re.fullmatch(r"\.env\.upload(-[0-9a-f]+)?", uploaded) \
                else ".env.upload"
            upload = path(root, "shared", name)
            with open(upload) as staged:
                wanted_text = with_secret_key(staged.read(), current)
            os.unlink(upload)
        elif not current.strip():
            # A first deploy gets a random secret key, so sessions are signed from day one.
            wanted_text = "SECRET_KEY=%s\n" % secrets.token_hex(32)
        else:
            wanted_text = current
        if wanted_text != current:
            stream.seek(0)
            stream.truncate()
            stream.write(wanted_text)
            changed = True
        if os.fstat(descriptor).st_mode & 0o777 != 0o600:
            os.fchmod(descriptor, 0o600)
            changed = True
    # Made ahead of the first hold, so that every request already takes its lock then.
    os.close(_open_gate(path(root, "shared", WRITE_GATE)))
    out(changed=changed)


# -- database ---------------------------------------------------------------------------------
def _databases(root):
    instance = path(root, "shared", "instance")
    if not os.path.isdir(instance):
        return []
    return sorted(name for name in os.listdir(instance) if name.endswith(DATABASE_SUFFIXES))


def _refuse_planted_links(database):
    """The app (www-data) writes shared/instance: a link it planted there, as the database or
    one of SQLite's side files, must not make the deploy user read or write another file."""
    import stat
    for name in (database, database + "-wal", database + "-shm", database + "-journal"):
        try:
            info = os.lstat(name)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            raise Refusal("%s is a link or not a plain file (planted by the app?); remove it, "
                          "then try again" % name)


def _read_only(file_name, timeout=5.0):
    """A database in a folder the app writes, opened read-only. SQLite rolls a hot journal
    (FILE-journal) back before it reads, and the journal names a "super-journal" that it then
    deletes: a journal the app planted would make the deploy user delete any file it can (its
    backups, ~/.ssh/authorized_keys). Read-only, SQLite refuses to roll back instead."""
    import sqlite3
    from urllib.parse import quote
    connection = sqlite3.connect("file:%s?mode=ro" % quote(file_name), uri=True, timeout=timeout)
    _refusing_rollback(connection.execute, "SELECT count(*) FROM sqlite_master", file_name)
    return connection


def _is_wal(file_name):
    """Whether a database's header says WAL (read without following a link)."""
    descriptor = os.open(file_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        return os.read(descriptor, 20)[18:20] == b"\x02\x02"
    finally:
        os.close(descriptor)


def _copy_database(source, target, file_name):
    _refusing_rollback(source.backup, target, file_name)


def _refusing_rollback(call, argument, file_name):
    import sqlite3
    try:
        call(argument)
    except sqlite3.OperationalError as error:
        if "readonly" not in str(error):
            raise
        raise Refusal("%s has a journal to roll back (%s-journal; a crash of the app, or "
                      "planted by it): the deploy user never rolls back the app's journals; "
                      "let the app open its database (restart it), then try again"
                      % (file_name, os.path.basename(file_name))) from None


WRITE_GATE = "write-gate"  # in shared/: gunicorn's pre_request hook holds requests on its lock
GATE_WAIT_S = 30


class write_gate:
    """While held, every request to the app waits in gunicorn's pre_request hook (conf/
    gunicorn.conf.py takes a shared lock on shared/write-gate for each request): a backup taken
    under it is exact, and restoring it undoes no acknowledged write. Taking it waits for the
    requests in flight to finish. The kernel drops the lock when this process ends, however it
    ends, so a killed deploy never leaves the app held."""

    def __init__(self, root):
        self.file_name = path(root, "shared", WRITE_GATE)
        self.descriptor = None
        self.held_since = 0.0

    def __enter__(self):
        import fcntl
        import time
        self.descriptor = _open_gate(self.file_name)
        deadline = time.monotonic() + GATE_WAIT_S
        while True:
            try:
                fcntl.flock(self.descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.descriptor)
                    raise Refusal("requests to the app still ran after %ds; nothing was backed "
                                  "up or changed, deploy again" % GATE_WAIT_S) from None
                time.sleep(0.01)
        self.held_since = time.monotonic()
        return self

    def held_seconds(self):
        import time
        return round(time.monotonic() - self.held_since, 3)

    def __exit__(self, *exc):
        os.close(self.descriptor)


def _open_gate(file_name):
    """The gate file, created 0640 in the app's group (the app only reads it); a link planted
    in its place is refused."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(file_name, flags)
    except FileNotFoundError:
        descriptor = os.open(file_name, flags | os.O_CREAT, 0o640)
        os.fchown(descriptor, -1, os.stat(os.path.dirname(file_name)).st_gid)
        os.fchmod(descriptor, 0o640)
        return descriptor


def _schema_of(connection):
    """What changes when migrations run: user_version and the schema's SQL."""
    rows = connection.execute("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")
    text = repr(list(rows)) + "|%d" % connection.execute("PRAGMA user_version").fetchone()[0]
    return _sha256(text.encode()).hexdigest()[:12]


def _take_backup(root, backup_root, release, suffix=""):
    """SQLite's online backup of every database: consistent even while the app writes. Writes
    backup.json beside the copies: the schema and the release that served them (retention)."""
    import datetime
    import sqlite3
    databases = _databases(root)
    if not databases:
        return None
    stamp = datetime.datetime.utcnow().strftime("%Y%m%dT%H%M%S%fZ")
    target = path(backup_root, "%s-%s%s" % (stamp, release, suffix))
    os.makedirs(target + ".partial")
    schemas = {}
    for name in databases:
        _refuse_planted_links(path(root, "shared", "instance", name))
        source = _read_only(path(root, "shared", "instance", name), timeout=10)
        copy = sqlite3.connect(path(target + ".partial", name))
        with copy:
            _copy_database(source, copy, path(root, "shared", "instance", name))
        # One self-contained file (a WAL copy needs -shm beside it to be read, and a reader
        # that cannot write in the backup's folder would fail).
        copy.execute("PRAGMA journal_mode=DELETE")
        schemas[name] = _schema_of(copy)
        copy.close()
        source.close()
    meta = {"schema": ",".join("%s:%s" % item for item in sorted(schemas.items())),
            "served_by": release_id_of(path(root, "current")), "time": stamp}
    write_atomically(path(target + ".partial", "backup.json"), json.dumps(meta, sort_keys=True))
    os.replace(target + ".partial", target)
    return target


def _restore_into(root, backup_dir):
    import sqlite3
    backup_dir = backup_dir_of(backup_dir)
    if not os.path.isdir(backup_dir):
        raise Refusal("no backup at %s; `doit backups` lists them" % backup_dir)
    restored = []
    for name in sorted(os.listdir(backup_dir)):
        if not name.endswith(DATABASE_SUFFIXES):
            continue
        _refuse_planted_links(path(root, "shared", "instance", name))
        # The timer's backups (scheduled/) are the app's files: a link there is refused too.
        _refuse_planted_links(path(backup_dir, name))
        source = _read_only(path(backup_dir, name))
        # The connection that writes would roll back a hot journal the app planted beside the
        # live database. The guard refuses one that is there now (read-only) and holds a read
        # lock while the writer takes its own (a rollback needs every other lock gone, so a
        # journal planted in between is never rolled back). The writer then never looks for a
        # journal again: a WAL database's connection never does, and a rollback-journal one
        # keeps its lock (exclusive locking mode; in WAL mode that would wait for the app).
        live_file = path(root, "shared", "instance", name)
        guard = _read_only(live_file, timeout=30)
        guard.isolation_level = None
        guard.execute("BEGIN")
        _refusing_rollback(guard.execute, "SELECT count(*) FROM sqlite_master", live_file)
        live = sqlite3.connect(live_file, timeout=30)
        if not _is_wal(live_file):
            live.execute("PRAGMA locking_mode=EXCLUSIVE").fetchone()
        live.execute("SELECT count(*) FROM sqlite_master").fetchone()
        guard.close()
        with live:
            _copy_database(source, live, path(backup_dir, name))
        live.close()
        source.close()
        restored.append(name)
    return restored


def cmd_backup(root, backup_root, release, keep, keep_days="0"):
    target = _take_backup(root, backup_root, release_name(release))
    removed = prune_backups(root, backup_root, int(keep), float(keep_days)) if target else []
    out(backup=target, pruned=removed)


def cmd_migrate_held(root, backup_root, release, keep, keep_days, unit):
    """Back up, then migrate (MIGRATE_COMMAND in UNIT), with every request to the app held: no
    write can land between the backup and the migration's end. If the migration fails, the
    backup is restored, and it is exact, so nothing the app acknowledged is lost."""
    import subprocess
    release = release_name(release)
    with write_gate(root) as gate:
        backup = _take_backup(root, backup_root, release)
        backed_up_s = gate.held_seconds()
        result = subprocess.run(["sudo", "-n", "systemctl", "start", unit],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                universal_newlines=True)
        migrated = result.returncode == 0
        restored = _restore_into(root, backup) if backup and not migrated else []
        held_s = gate.held_seconds()
    removed = prune_backups(root, backup_root, int(keep), float(keep_days)) if backup else []
    out(backup=backup, migrated=migrated, restored=restored, held_s=held_s,
        backup_s=round(backed_up_s, 3), pruned=removed)


def cmd_restore(root, backup_dir, backup_root=""):
    """Write a backup back into the live database files (SQLite's backup API). With
    backup_root (`doit restore`), backup_dir is a name found there or in its scheduled/, and
    a safety backup of what is about to be overwritten comes first; both under the write
    gate, so the safety backup holds every acknowledged write."""
    if backup_root:
        backup_dir = _find_backup(backup_root, os.path.basename(backup_dir))
    if not os.path.isdir(backup_dir):
        raise Refusal("no backup at %s; `doit backups` lists them" % backup_dir)
    with write_gate(root) as gate:
        safety = _take_backup(root, backup_root, release_id_of(path(root, "current")) or "none",
                              "-before-restore") if backup_root else None
        restored = _restore_into(root, backup_dir)
        held_s = gate.held_seconds()
    out(restored=restored, backup=backup_dir, safety_backup=safety, held_s=held_s)


def _backup_meta(backup_root, name):
    try:
        with open(path(backup_root, name, "backup.json")) as stream:
            return json.load(stream)
    except (OSError, ValueError):
        return {}


def prune_backups(root, backup_root, keep, keep_days):
    """Keep the newest KEEP, everything younger than KEEP_DAYS, the last backup taken before
    each schema change, and for every release still on the server the newest backup of the
    schema it served (so no kept release loses the only copy of its schema)."""
    import time
    names = _backup_names(backup_root)
    metas = {name: _backup_meta(backup_root, name) for name in names}
    kept = set(names[-keep:])
    now = time.time()
    for name in names:
        if keep_days and now - os.stat(path(backup_root, name)).st_mtime < keep_days * 86400:
            kept.add(name)
    for older, newer in zip(names, names[1:]):
        if metas[older].get("schema") != metas[newer].get("schema"):
            kept.add(older)
    releases = set(os.listdir(path(root, "releases"))) if os.path.isdir(
        path(root, "releases")) else set()
    newest_of_release = {}
    for name in names:
        if metas[name].get("served_by") in releases:
            newest_of_release[metas[name]["served_by"]] = name
    kept |= set(newest_of_release.values())
    removed = [name for name in names if name not in kept]
    for name in removed:
        rmtree(path(backup_root, name), ignore_errors=True)
    return removed


SCHEDULED = "scheduled"  # in BACKUP_PATH, a link to /var/lib/<service>/backups: the timer's


def _backup_names(folder):
    """Finished backups in a folder, oldest first (their names start with the time)."""
    if not os.path.isdir(folder):
        return []
    # Links are no backups: scheduled/ is the app user's, who could point one anywhere.
    return sorted(name for name in os.listdir(folder) if name[:8].isdigit()
                  and not name.endswith(".partial") and os.path.isdir(path(folder, name))
                  and not os.path.islink(path(folder, name)))


def _find_backup(backup_root, name):
    """A backup by name: a deploy's (BACKUP_PATH/NAME) or the timer's (BACKUP_PATH/scheduled)."""
    for folder in (backup_root, path(backup_root, SCHEDULED)):
        if name in _backup_names(folder):
            return path(folder, name)
    raise Refusal("no backup %s in %s; `doit backups` lists them" % (name, backup_root))


def cmd_backup_files(backup_root, name=""):
    """The newest backup (or NAME): its files with their sha256, for `doit backup-pull`."""
    if name:
        backup = _find_backup(backup_root, name)
    else:
        names = sorted((item, folder) for folder in (backup_root, path(backup_root, SCHEDULED))
                       for item in _backup_names(folder))
        if not names:
            raise Refusal("no backups in %s yet" % backup_root)
        backup = path(names[-1][1], names[-1][0])
    files = [{"name": item, "sha256": sha256_of(path(backup, item)),
              "size": os.path.getsize(path(backup, item))}
             for item in sorted(os.listdir(backup)) if os.path.isfile(path(backup, item))
             and not os.path.islink(path(backup, item))]
    out(backup=backup, files=files)


def cmd_backups(backup_root):
    """Every backup, the deploys' and the timer's, oldest first (by time, in their names)."""
    found = [path(backup_root, name) for name in _backup_names(backup_root)]
    found += [path(backup_root, SCHEDULED, name)
              for name in _backup_names(path(backup_root, SCHEDULED))]
    out(backups=sorted(found, key=os.path.basename))


# -- switching --------------------------------------------------------------------------------
MIGRATE_COMMAND_FILE = ".migrate-command"
HEALTH_PATH_FILE = ".health-path"  # the HEALTH_PATH a release was deployed with
HEALTH_PATH_FORM = r"/[A-Za-z0-9._~/-]*"  # as scripts/settings.py's HEALTH_PATH


def cmd_set_next(root, release, migrations_paths="", migrate_command=None, health_path=None):
    """Point `next` at the release; with MIGRATIONS_PATHS, also say whether they are the same
    as in the live release (then its migrations have already run). MIGRATE_COMMAND is kept in
    the release, where the -migrate unit (the app user, hardened) runs it: it can change with
    any deploy, and root never reads it. HEALTH_PATH travels with the release as well: a
    rollback checks the old release where it answers (`health_path` in the answer)."""
    release = release_name(release)
    if not os.path.isfile(path(root, "releases", release, ".unpacked")):
        raise Refusal("release %s is not on this server; deploy it first" % release)
    if migrate_command is not None:  # a deploy's; a rollback runs no migrations
        write_atomically(path(root, "releases", release, MIGRATE_COMMAND_FILE),
                         migrate_command + "\n", mode=0o640)
    if health_path is not None:
        write_atomically(path(root, "releases", release, HEALTH_PATH_FILE), health_path + "\n",
                         mode=0o640)
    link_atomically(path(root, "next"), path("releases", release))
    paths = [item for item in migrations_paths.split(",") if item]
    for item in paths:
        if not os.path.exists(path(root, "releases", release, item)):
            raise Refusal("setting MIGRATIONS_PATHS: %s is not in release %s; name the app's "
                          "migrations, or leave it empty to always migrate" % (item, release))
    wanted = {item: _digests(path(root, "releases", release, item)) for item in paths}
    out(changed=True, health_path=_health_path_of(root, release),
        **migrations_against_live(root, release, wanted, migrate_command))


def migrations_against_live(root, release, wanted, migrate_command):
    """Whether the release's migrations already ran: every MIGRATIONS_PATHS item (WANTED: item
    -> {file: sha256}) holds the live release's bytes, and the live release kept the same
    MIGRATE_COMMAND (another command may migrate differently). Also what differs, so the
    migrate step can say why it runs. A rollback (no command) compares the files only."""
    current = release_id_of(path(root, "current"))
    if not wanted or current in (None, release):
        return {"migrations_unchanged": False, "current": current, "migrations_changed": [],
                "command_changed": False}
    changed = [item for item in wanted
               if _digests(path(root, "releases", current, item)) != wanted[item]]
    command_changed = migrate_command is not None and \
        _kept_command(root, current) != migrate_command
    return {"migrations_unchanged": not changed and not command_changed, "current": current,
            "migrations_changed": changed, "command_changed": command_changed}


def _kept_command(root, release):
    """The MIGRATE_COMMAND a release was deployed with; None for one deployed before it was
    kept (its migrations then run once more)."""
    try:
        with open(path(root, "releases", release, MIGRATE_COMMAND_FILE)) as stream:
            return stream.read().removesuffix("\n")
    except OSError:
        return None


def _health_path_of(root, release):
    """The HEALTH_PATH the release was deployed with; None for one deployed before it was kept."""
    import re
    try:
        with open(path(root, "releases", release, HEALTH_PATH_FILE)) as stream:
            kept = stream.read().strip()
    except OSError:
        return None
    return kept if re.fullmatch(HEALTH_PATH_FORM, kept) else None


def _digests(top):
    """{file: sha256} of a file ("") or of a folder's files (bytecode caches aside); {} for
    nothing there. A package's manifest gives the same for its files (see cmd_plan)."""
    if os.path.isfile(top):
        return {"": sha256_of(top)}
    found = {}
    for folder, dirs, names in os.walk(top):
        dirs[:] = [name for name in dirs if name != "__pycache__"]
        for name in names:
            full = path(folder, name)
            if os.path.isfile(full) and not os.path.islink(full):
                found[os.path.relpath(full, top)] = sha256_of(full)
    return found


def cmd_switch(root, release):
    release = release_name(release)
    previous = release_id_of(path(root, "current"))
    if previous == release:
        out(changed=False, previous=previous)
        return
    link_atomically(path(root, "current"), path("releases", release))
    out(changed=True, previous=previous)


def cmd_health(url, expect_release, timeout):
    """Poll url until it answers 2xx with the expected release (when it reports one)."""
    out(ok=True, release=wait_healthy(url, expect_release, timeout))


REDIRECTS = (301, 302, 303, 307, 308)


def http_get(url, timeout=5):
    """(status, body) of a GET of an http:// URL, redirects on http:// followed (as urllib
    would, up to 10). HTTP/1.0: the answer is never chunked and ends where the connection
    does. Not urllib: importing http.client (and email's parser) would cost ~18 ms of CPU in
    nearly every run of this tool (probe, preflight, restart and verify all ask for health)."""
    import socket
    from urllib.parse import urljoin, urlsplit
    for _ in range(11):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise OSError("not an http:// URL: %s" % url)
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        host = parts.hostname
        if host.isascii():  # as bytes: a str name would load the IDNA codec (~1.5 ms)
            host = host.encode()
        with socket.create_connection((host, parts.port or 80), timeout) as link:
            link.sendall(("GET %s HTTP/1.0\r\nHost: %s\r\nUser-Agent: flask-deploy\r\n"
                          "Connection: close\r\n\r\n" % (target, parts.netloc)).encode())
            answer = b"".join(iter(lambda: link.recv(1 << 16), b""))
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(None, 2)
        if len(status) < 2 or not status[0].startswith("HTTP/") or not status[1].isdigit():
            raise OSError("not an HTTP answer: %r" % lines[0][:80])
        location = [line.split(":", 1)[1].strip() for line in lines[1:]
                    if line.lower().startswith("location:")]
        if int(status[1]) not in REDIRECTS or not location:
            return int(status[1]), body
        url = urljoin(url, location[0])
    raise OSError("redirected more than 10 times")


def wait_healthy(url, expect_release, timeout, alive=None):
    """The release url reports once it answers healthy (None: it reports none), or Refusal;
    also as soon as ALIVE() says the process that would answer has ended."""
    import time
    deadline = time.monotonic() + float(timeout)
    last = "no answer"
    while True:
        refused = False
        try:
            status, body = http_get(url)
        except OSError as error:
            last = str(error)
            refused = isinstance(error, ConnectionRefusedError)
        else:
            if 200 <= status < 300:
                release = _reported_release(body.decode(errors="replace"))
                if not expect_release or release in (None, expect_release):
                    return release
                last = "it runs release %s, not %s" % (release, expect_release)
                _refuse_a_foreign_release(url, release, expect_release)
            else:
                last = "HTTP %d" % status
                if status not in RETRYABLE_HTTP:
                    # The app answered, and answered wrong: waiting will not change that.
                    raise Refusal("%s answered %s; not healthy (waiting would not change it)"
                                  % (url, last))
        if time.monotonic() > deadline:
            raise Refusal("%s did not answer healthy within %ss: %s" % (url, timeout, last))
        if alive is not None and not alive():
            raise Refusal("it ended before %s answered healthy: %s" % (url, last))
        # Another release answering: the one handing over is still finishing; it is quick.
        # Nothing listening yet: a boot under way, and a refused connection costs nothing.
        time.sleep(0.02 if last.startswith("it runs release") or refused else 0.1)


def _reported_release(body):
    """JSON with `release` is checked; plain text (or other JSON) is just healthy (None)."""
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    return answer.get("release") if isinstance(answer, dict) else None


def _refuse_a_foreign_release(url, release, expect_release):
    """Not a release id at all: the app's `release` means something of its own (a version),
    and no wait makes it this release's id."""
    import re
    id_form = "[0-9a-f]{12}"
    if re.fullmatch(id_form, expect_release) and not (
            isinstance(release, str) and re.fullmatch(id_form, release)):
        raise Refusal("%s answered JSON whose `release` is %r, not the release id %s; "
                      "a JSON `release` in the health answer must be the id from the "
                      "package's manifest.json: report that, or name the app's own "
                      "version another way" % (url, release, expect_release))


def cmd_verify(spec_json):
    """Every check of `doit verify` in one call, run side by side: the service's state, health
    checks (url, expected release) and the guide's commands as the deploy user types them.
    SPEC: {"active": unit, "expected": id, "timeout": s, "health": [[label, url]],
    "commands": [[label, argv, file]]}; a command with a file is skipped when that file is
    empty (the app logs to the journal). Answers [ok, label, detail] per check, in order."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor
    spec = json.loads(spec_json)

    def run(argv):
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True)
        return result.returncode, result.stdout, result.stderr

    def active():
        _, stdout, _ = run(["systemctl", "is-active", spec["active"]])
        return ["active", stdout.strip()]

    def health(url):
        try:
            return ["healthy", wait_healthy(url, spec["expected"], spec["timeout"])]
        except Refusal as refusal:
            return ["unhealthy", str(refusal)]

    def command(argv, file_name):
        if file_name and not (os.path.isfile(file_name) and os.path.getsize(file_name)):
            return ["empty", file_name]
        status, _, stderr = run(argv)
        return ["ran", status, stderr]
    jobs = [active] + [lambda url=url: health(url) for _, url in spec["health"]] + \
        [lambda argv=argv, name=name: command(argv, name) for _, argv, name in spec["commands"]]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda job: job(), jobs))
    out(answers=answers)


def _systemctl(action, unit):
    """sudo systemctl ACTION UNIT (sudoers allows exactly the forms deploys use): its status."""
    import subprocess
    return subprocess.run(["sudo", "-n", "systemctl", action, unit], stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode


def _started_healthy(action, unit, url, release, timeout):
    """sudo systemctl ACTION UNIT, then its health at URL required: started, healthy, and
    what went wrong (systemctl's last line, or the health check's)."""
    import subprocess
    result = subprocess.run(["sudo", "-n", "systemctl", action, unit],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, universal_newlines=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        return {"started": False, "healthy": False,
                "error": (lines or ["exit status %d" % result.returncode])[-1]}
    try:
        wait_healthy(url, release, timeout)
    except Refusal as refusal:
        return {"started": True, "healthy": False, "error": str(refusal)}
    return {"started": True, "healthy": True}


def cmd_preflight(root, app_unit, unit, url, release, timeout, beside="1"):
    """The release on the spare port, its health at URL required, in one call. When the
    running service can take a hand-over (and BESIDE), it boots the release beside the live
    one, as a candidate that takes over at the switch (conf/gunicorn.conf.py): the app boots
    once per deploy. Otherwise the release in `next` runs in the preflight UNIT: started,
    checked, stopped again. The caller reads the journal named in the answer when it did not
    start."""
    show, preflight = _units_show([app_unit, unit], HAND_OVER_FACTS)  # one systemctl
    if preflight.get("ActiveState") not in ("inactive", "failed"):
        # A leftover of a killed deploy or rollback, or the last one stopping: it holds the
        # spare port, which a candidate needs as much as the unit does.
        _systemctl("stop", unit)
    answer = _preflight_beside(root, app_unit, show, url, release, timeout) if beside else None
    if answer is None:
        _end_a_candidate(root, app_unit)
        _preflight_unit(unit, url, release, timeout)
    else:
        out(**answer)


def _preflight_beside(root, unit, show, url, release, timeout):
    """Point `candidate` at RELEASE and signal the service, whose master boots it on the spare
    port; then require its health. A failed one is ended again (`candidate` removed, the signal
    again). None when the service cannot take a hand-over (SHOW: its HAND_OVER_FACTS; see
    _handed_over)."""
    if not _can_hand_over(unit, show):
        return None
    candidate = path(root, CANDIDATE_LINK)
    link_atomically(candidate, path("releases", release))
    pid = _hand_over_signal(unit) == 0 and _candidate_pid(unit, release, show)
    if not pid:
        _remove_link(candidate)
        return None
    try:
        wait_healthy(url, release, timeout, alive=lambda: _alive(pid))
    except Refusal as refusal:
        started = _alive(pid)
        _end_a_candidate(root, unit)
        return {"started": started, "healthy": False, "error": str(refusal), "how": "beside",
                "journal": unit, "since": "releases/%s: booting it beside" % release}
    return {"started": True, "healthy": True, "how": "beside"}


def cmd_end_candidate(root, unit):
    """A deploy that will not switch after its preflight (a pre-switch hook failed, a rollout
    stopped): the candidate it booted ends now, not after CANDIDATE_WAIT_S
    (conf/gunicorn.conf.py)."""
    candidate = path(root, CANDIDATE_LINK)
    had = os.path.islink(candidate)
    out(changed=_end_a_candidate(root, unit) or had)


def _end_a_candidate(root, unit):
    """End the candidate the service's status names, if any (whether it did): `candidate`
    pointing at no release asks the live master to end it and do nothing else, even when
    `current` names its release (a deploy cut after its switch; a plain signal would put it
    live). Without a candidate in the status no signal: it would hand the live release over
    to itself."""
    said = _unit_show(unit, "StatusText").get("StatusText", "")
    candidate = path(root, CANDIDATE_LINK)
    if not said.startswith("preflight of "):
        _remove_link(candidate)
        return False
    link_atomically(candidate, "ended")
    try:
        if _hand_over_signal(unit) == 0:
            _next_status(unit, said)
    finally:
        _remove_link(candidate)
    return True


def _candidate_pid(unit, release, show):
    """The pid of the candidate master the service says it booted (its status), within a
    second; 0 when it does not answer. The status before the signal (SHOW) counts only while
    its candidate runs: the master keeps that one (a deploy of the same release, cut short)."""
    said = "preflight of %s: pid " % release

    def names_one(status):
        pid = status[len(said):]
        return status.startswith(said) and pid.isdigit() and \
            (status != show.get("StatusText") or _alive(int(pid)))
    status = _status_when(unit, names_one)
    return int(status[len(said):]) if status else 0


def _alive(pid):
    """Whether PID runs (the app user's: signal 0 is refused, not answered ESRCH)."""
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except ProcessLookupError:
        return False
    return True


def _remove_link(link):
    try:
        os.unlink(link)
    except FileNotFoundError:
        pass


def _preflight_unit(unit, url, release, timeout):
    """The release in `next` on the spare port (UNIT): started, its health at URL required,
    stopped again. A healthy preflight is stopped in the background: the deploy goes on to the
    switch and restart (another unit, another port) while it shuts down, and the next
    preflight's own first `stop` waits for a stop still under way."""
    import subprocess
    answer = {"healthy": False}
    try:
        answer = _started_healthy("start", unit, url, release, timeout)
        out(how="unit", journal=unit, **answer)
    finally:
        if answer["healthy"]:
            subprocess.Popen(["sudo", "-n", "systemctl", "stop", unit], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        else:
            _systemctl("stop", unit)


def cmd_restart(root, unit, url, release, timeout):
    """Put the app's service onto `current` and require its health at URL, in one call: by a
    hand-over when the running service can take one (conf/gunicorn.conf.py: the old release
    serves until the new one has booted, then stays parked for a rollback), else by a restart
    (its socket holds new connections meanwhile). Failed starts before (a reboot with a broken
    release), and the restarts of deploys and rollbacks seconds apart, must not rate-limit a
    restart (systemd's StartLimitBurst counts every start): reset-failed first."""
    how = _handed_over(root, unit, release, timeout)
    if how:
        try:
            wait_healthy(url, release, timeout)
        except Refusal as refusal:
            out(started=True, healthy=False, error=str(refusal), how=how)
            return
        out(started=True, healthy=True, how=how)
        return
    _systemctl("reset-failed", unit)
    out(how="restarted", **_started_healthy("restart", unit, url, release, timeout))


def _next_status(unit, status):
    """UNIT's status once it is another than STATUS (STATUS after a second without)."""
    return _status_when(unit, lambda now: now != status) or status


def _status_when(unit, accept):
    """UNIT's status (systemd's StatusText, which the live master sets) once ACCEPT(status),
    looked at every 10 ms for a second; None when it never was."""
    import time
    started = time.monotonic()
    while time.monotonic() - started < 1:
        time.sleep(0.01)
        status = _unit_show(unit, "StatusText").get("StatusText", "")
        if accept(status):
            return status
    return None


def _unit_show(unit, *names):
    return _units_show([unit], names)[0]


def _units_show(units, names):
    """`systemctl show` of NAMES for each of UNITS, in one call (a process start is most of
    its ~6 ms of CPU): a dict per unit, in order."""
    import subprocess
    text = subprocess.run(["systemctl", "show", "-p", ",".join(names), *units],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, universal_newlines=True).stdout
    blocks = text.split("\n\n")  # systemctl separates the units' blocks by an empty line
    return [dict(line.partition("=")[::2] for line in block.splitlines())
            for block in blocks + [""] * (len(units) - len(blocks))][:len(units)]


def _started_with_what_is_there(unit, show):
    """Whether what systemd gave the running service at its start (the unit, its drop-ins, the
    app's environment, gunicorn's config) is unchanged since: a hand-over passes all of that on,
    so a change needs a real restart."""
    import time
    if show.get("NeedDaemonReload") != "no":
        return False
    try:
        started = int(show["ActiveEnterTimestampMonotonic"]) / 1e6
    except (KeyError, ValueError):
        return False
    folder = "/etc/%s" % unit
    paths = [show.get("FragmentPath", ""), folder + "/app.env", folder + "/gunicorn.conf.py"]
    paths += show.get("DropInPaths", "").split()
    offset = time.time() - time.monotonic()  # file times are wall-clock, systemd's monotonic
    for path in filter(None, paths):
        try:
            if os.stat(path).st_mtime - offset >= started:
                return False
        except FileNotFoundError:
            continue
        except OSError:
            return False
    return True


HAND_OVER_FACTS = ("ActiveState", "MainPID", "StatusText", "NeedDaemonReload",
                   "ActiveEnterTimestampMonotonic", "FragmentPath", "DropInPaths")
CANDIDATE_LINK = "candidate"  # the release a preflight boots beside the live one


def _can_hand_over(unit, show):
    """Running, and with what systemd gave it at its start (SHOW: HAND_OVER_FACTS)."""
    return show.get("ActiveState") == "active" and show.get("MainPID", "0") not in ("", "0") \
        and _started_with_what_is_there(unit, show)


def _hand_over_signal(unit):
    """As scripts/deploy/commands.py's hand_over (this file runs with the standard library
    only): the one signal sudoers lets a deploy send. Its exit status."""
    import subprocess
    return subprocess.run(["sudo", "-n", "systemctl", "kill", "--kill-whom=main",
                           "--signal=SIGURG", unit], stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


def _handed_over(root, unit, release, timeout):
    """Ask the running service to serve `current` (SIGURG to its main process; sudoers allows
    exactly that) and wait until a master of RELEASE is the main process: "handed over" (a new
    master booted; the old one parked), "took over" (the candidate the preflight booted took
    the live socket; the old one parked), either "... alone" (the old one ended) or "woke" (the
    parked one of RELEASE serves again). None when the service cannot take a hand-over (not
    running, started with other settings, or a gunicorn config without it: no answer within a
    second) or did not finish one in time; then it restarts."""
    import time
    _remove_link(path(root, CANDIDATE_LINK))  # a candidate on `current` takes over; others end
    show = _unit_show(unit, *HAND_OVER_FACTS)
    before = show.get("MainPID", "0")
    if not _can_hand_over(unit, show) or _hand_over_signal(unit) != 0:
        return None
    said = show.get("StatusText", "")
    took_over = said.startswith("preflight of %s: " % release)
    if said.startswith("preflight of ") and not took_over and \
            _next_status(unit, said).endswith("; preflight ended"):
        # A killed deploy's candidate of another release: the signal ended it and, `current`
        # being the live release (a restore), did nothing more, as after a failed preflight.
        # The hand-over is the next signal.
        if _hand_over_signal(unit) != 0:
            return None
    started = time.monotonic()
    while time.monotonic() - started < float(timeout):
        time.sleep(0.02)  # each look is a systemctl (~6 ms of CPU); a take-over takes ~40 ms
        now = _unit_show(unit, "ActiveState", "MainPID", "StatusText")
        status = now.get("StatusText", "")
        if now.get("ActiveState") != "active":
            return None
        if now.get("MainPID") != before and status.split()[:2] == ["serving", release]:
            how = " ".join(status.split()[2:])  # conf/gunicorn.conf.py's _serving
            if how == "again":
                return "woke"
            pid = said.rpartition(" ")[2]
            took = took_over and pid.isdigit() and _alive(int(pid))  # else a fresh one booted
            return ("took over" if took else "handed over") + (" alone" if how else "")
        if status == show.get("StatusText") and time.monotonic() - started > 1:
            return None  # no answer: the running gunicorn config has no hand-over
    return None


def _mark_good(root, release):
    """Newest last: a release deployed again moves to the end."""
    write_ids(root, "good-releases",
              [name for name in read_good(root) if name != release] + [release])
    failed = read_ids(root, "failed-releases")
    if release in failed:  # forced, and it went live this time
        write_ids(root, "failed-releases", [name for name in failed if name != release])


def cmd_mark_failed(root, release):
    """A release that failed verification: no rollback target, and not shipped again unless
    the deploy is forced."""
    write_ids(root, "good-releases", [name for name in read_good(root) if name != release])
    write_ids(root, "failed-releases",
              [name for name in read_ids(root, "failed-releases") if name != release] +
              [release])
    out(changed=True)


def cmd_rolled_back(root, target, rolled_back_from, entry_json=""):
    """After a rollback from one release to another, history matches what people did: the
    target is the newest good release (what a later deploy's rollback returns to, and what
    pruning keeps as the release before), and the release rolled back from is no rollback
    target any more (it stays on disk until pruned; RELEASE=<id> while it is there). With
    ENTRY_JSON, the deploy log's line for the rollback too (one round trip)."""
    target, rolled_back_from = release_name(target), release_name(rolled_back_from)
    good = [name for name in read_good(root) if name not in (target, rolled_back_from)]
    write_atomically(path(root, "good-releases"), "".join(name + "\n" for name in good + [target]))
    if entry_json:
        with _captured():
            cmd_log(root, entry_json)
    out(changed=True, good=good + [target])


def cmd_previous_good(root):
    current = release_id_of(path(root, "current"))
    good = [name for name in read_good(root)
            if os.path.isfile(path(root, "releases", name, ".unpacked"))]
    before = good[:good.index(current)] if current in good else good
    out(current=current, previous=before[-1] if before else None)


def cmd_prune(root, keep):
    """Keep the newest KEEP good releases, always the current one and the one before it; remove
    failed releases, venvs no release uses, and packages of removed releases."""
    keep = int(keep)
    current = release_id_of(path(root, "current"))
    deploying = release_id_of(path(root, "next"))
    good = read_good(root)
    kept = set(good[-keep:]) | {current, deploying}
    if current in good and good.index(current) > 0:
        kept.add(good[good.index(current) - 1])
    removed = []
    for name in os.listdir(path(root, "releases")):
        release_name = name[:-len(".partial")] if name.endswith(".partial") else name
        stale_partial = name.endswith(".partial") and release_name != deploying
        if release_name not in kept or stale_partial:
            rmtree(path(root, "releases", name), ignore_errors=True)
            removed.append(name)
    if removed:
        write_atomically(path(root, "good-releases"),
                         "".join(name + "\n" for name in good if name not in removed))
    used_venvs = set()
    for name in os.listdir(path(root, "releases")):
        link = path(root, "releases", name, ".venv")
        if os.path.islink(link):
            used_venvs.add(os.path.basename(os.readlink(link)))
    venvs = path(root, "shared", "venvs")
    for name in os.listdir(venvs) if os.path.isdir(venvs) else []:
        if name not in used_venvs:
            rmtree(path(venvs, name), ignore_errors=True)
    packages = path(root, "packages")
    kept_ids = set(os.listdir(path(root, "releases")))
    for name in os.listdir(packages) if os.path.isdir(packages) else []:
        release_of_package = name.rsplit("-", 1)[-1].split(".")[0]
        if release_of_package not in kept_ids:
            os.unlink(path(packages, name))
    out(removed=sorted(removed))


def cmd_finish(root, release, keep):
    """A release that went live: mark it good, then prune (one round trip for both)."""
    release = release_name(release)
    _mark_good(root, release)
    cmd_prune(root, keep)


def cmd_log(root, entry_json):
    json.loads(entry_json)  # one valid JSON object per line, or nothing
    with open(path(root, "deploy-log.jsonl"), "a") as stream:
        stream.write(entry_json.strip() + "\n")
    out(changed=True)


def cmd_history(root, count):
    try:
        with open(path(root, "deploy-log.jsonl")) as stream:
            lines = stream.readlines()[-int(count):]
    except FileNotFoundError:
        lines = []
    out(entries=[json.loads(line) for line in lines if line.strip()])


def cmd_disk(*folders):
    free = {}
    for folder in folders:
        probe = folder
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        stats = os.statvfs(probe)
        free[folder] = stats.f_bavail * stats.f_frsize // (1 << 20)
    out(free_mb=free)


def cmd_serve():
    """Every call of one deploying connection in this one process: a JSON argv per line in,
    a JSON {status, stdout, stderr} per line out, until the input ends. A fresh python3 per
    call costs ~50 ms of start-up and compiling; a deploy makes 15 calls or more. The channel
    is kept off file descriptors 0-2 so that no child a command starts can read or write it;
    what children print is captured per call, as it would be in a call of its own."""
    import contextlib
    import gc
    import io
    import tempfile
    requests = os.fdopen(os.dup(0), "r")
    answers = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    print(json.dumps({"serving": True}), file=answers, flush=True)
    for line in requests:
        argv = json.loads(line)
        stdout, stderr = io.StringIO(), io.StringIO()
        with tempfile.TemporaryFile() as children:
            os.dup2(children.fileno(), 1)
            os.dup2(children.fileno(), 2)
            try:
                with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                    # Never nested: a second serve would read this one's /dev/null stdin.
                    status = main(argv if argv[:1] != ["serve"] else ["serve-nested"])
            except SystemExit as leaving:
                status = leaving.code if isinstance(leaving.code, int) else 1
            finally:
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
            if status:
                # A failed call may leave what it opened (sqlite connections sit in reference
                # cycles) to the collector; its own process would have ended and closed them.
                # Kept, they would hold the app's database files for the rest of the run.
                gc.collect()
            # Its tail only: a child's megabytes would make an answer line the deploying
            # machine refuses (and the last lines are the ones that say what went wrong).
            children.seek(max(0, os.fstat(children.fileno()).st_size - (64 << 10)))
            printed = children.read().decode(errors="replace")
        answers.write(json.dumps({"status": status, "stdout": printed + stdout.getvalue(),
                                  "stderr": printed + stderr.getvalue()}) + "\n")
        answers.flush()


COMMANDS = {
    "probe": cmd_probe, "plan": cmd_plan, "lock": cmd_lock, "unlock": cmd_unlock,
    "has-package": cmd_has_package, "accept-package": cmd_accept_package,
    "unpack": cmd_unpack, "venv": cmd_venv, "link-shared": cmd_link_shared,
    "backup": cmd_backup, "restore": cmd_restore, "backups": cmd_backups,
    "migrate-held": cmd_migrate_held, "backup-files": cmd_backup_files,
    "set-next": cmd_set_next, "switch": cmd_switch, "health": cmd_health,
    "rolled-back": cmd_rolled_back, "mark-failed": cmd_mark_failed,
    "previous-good": cmd_previous_good,
    "prune": cmd_prune,
    "finish": cmd_finish, "log": cmd_log, "history": cmd_history, "disk": cmd_disk,
    "verify": cmd_verify, "preflight": cmd_preflight, "restart": cmd_restart,
    "end-candidate": cmd_end_candidate,
    "prepare": cmd_prepare, "serve": cmd_serve,
}


def main(argv):
    # Releases and venvs are read by the app through its group (setgid folders give it);
    # nobody else needs to read them.
    os.umask(0o027)
    if not argv or argv[0] not in COMMANDS:
        print("error: server_tool: unknown command %r" % (argv[:1],), file=sys.stderr)
        return 2
    try:
        COMMANDS[argv[0]](*argv[1:])
    except Refusal as refusal:
        print("error: %s" % refusal, file=sys.stderr)
        return 2
    except Exception as error:  # OSError, sqlite3.Error, TarError...: one line, no traceback
        print("error: %s: %s: %s" % (argv[0], type(error).__name__, error), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
