"""A Jupyter kernel provisioner that makes every kernel a session-reaper session.

A kernel spec opts in with::

    "metadata": {"kernel_provisioner": {
        "provisioner_name": "session-reaper-provisioner",
        "config": {"socket": "/run/session-reaper/reaper.sock", "required": true}}}

Lifecycle of one kernel launch (a restart is a new launch, hence a new session):

* ``pre_launch``: chooses the session id (``jupyter-<kernel id>-<8 hex>``) and puts it in the
  kernel's environment as ``REAPER_SESSION_ID`` (the daemon's cookie: every process carrying
  it belongs to the session, wherever it is re-parented); creates the kernel's own runtime
  directory (``.reaper-<session id>`` next to the connection file, mode 0700) and points the
  kernel's ``JUPYTER_RUNTIME_DIR`` (and with ``private_tmp`` its ``TMPDIR``) at it.
* ``launch_kernel``: once the kernel process runs, registers it: engine = the kernel's pid,
  ``ownerPid`` = this process (the Jupyter server: if it dies, even by SIGKILL, the daemon
  reaps its kernels as ``owner_gone``), paths = the connection file and the kernel's own
  directory (never the shared runtime directory). A background thread then adds the
  kernel's five ports as soon as it listens on them (``PATCH /v1/sessions/{id}``; the daemon
  only accepts ports the kernel's process tree holds) and heartbeats.
* Shutdown: the session is closed (``DELETE``, reason ``closed``) *before* the kernel is
  told to stop, so the daemon records a requested end, not a crash; it then waits for the
  kernel to exit, verifies the ports free and deletes the paths. On a restart the old
  session's cleanup is awaited before the new kernel binds the same ports.
* ``get_provisioner_info`` / ``load_provisioner_info`` carry the session id, so a server that
  loads a kernel's provisioner info re-attaches: it heartbeats the same session and closes
  it at shutdown.
"""

from __future__ import annotations

import asyncio
import functools
import getpass
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, TypeVar

from jupyter_client.provisioning import LocalProvisioner
from traitlets import Bool, Dict as DictTrait, Float, Integer, Unicode

from .client import ReaperApiError, ReaperClient, ReaperUnreachable, default_socket

#: The daemon's session cookie (``src/model/session.ts`` SESSION_COOKIE).
SESSION_COOKIE = "REAPER_SESSION_ID"

#: The five ports of a kernel's connection info, in a fixed order.
PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port")

#: The key under which get_provisioner_info() saves this provisioner's state.
INFO_KEY = "session_reaper"

T = TypeVar("T")


# --- /proc ------------------------------------------------------------------------------


def proc_start_time(pid: int) -> Optional[int]:
    """``/proc/<pid>/stat`` field 22 (start time in clock ticks): with the pid, the
    process's identity. None if there is no such process or it has exited (a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def proc_alive(pid: int, start_time: Optional[int]) -> bool:
    """The process runs and, when ``start_time`` is known, is still the same process."""
    now = proc_start_time(pid)
    return now is not None and (start_time is None or now == start_time)


def listening_ports() -> Set[int]:
    """Local ports with a TCP socket in LISTEN, from /proc/net/tcp and tcp6."""
    ports: Set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) > 3 and parts[3] == "0A":
                        ports.add(int(parts[1].rsplit(":", 1)[1], 16))
        except OSError:
            pass
    return ports


def _jitter(seconds: float) -> float:
    """±10%, so kernels started together do not heartbeat in lockstep."""
    return seconds * (0.9 + 0.2 * random.random())


def _session_id(kernel_id: str, token: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._:@-]", "-", kernel_id)[:100] or "kernel"
    return f"jupyter-{safe}-{token}"


class AttachedKernel:
    """A kernel this process did not start (re-attached from provisioner info), with the
    part of ``subprocess.Popen`` that LocalProvisioner uses. Known by pid and start time,
    and signalled through a pidfd where the kernel has them, so a reused pid is never hit."""

    stdin = stdout = stderr = None

    def __init__(self, pid: int, start_time: Optional[int]) -> None:
        self.pid = pid
        self.start_time = start_time
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None and not proc_alive(self.pid, self.start_time):
            # Not our child: its exit status is its parent's to collect.
            self.returncode = 0
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if end is not None and time.monotonic() > end:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            time.sleep(0.05)
        return self.returncode or 0

    def send_signal(self, signum: int) -> None:
        pidfd_open = getattr(os, "pidfd_open", None)
        if pidfd_open is None:
            if self.poll() is None:
                os.kill(self.pid, signum)
            return
        try:
            fd = pidfd_open(self.pid)
        except ProcessLookupError:
            self.returncode = 0 if self.returncode is None else self.returncode
            return
        try:
            if self.poll() is None:  # the pidfd now pins the process it was checked on
                signal.pidfd_send_signal(fd, signum)
        finally:
            os.close(fd)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


# --- per launch state and the heartbeat thread ------------------------------------------


class Launch:
    """One kernel process and its session."""

    def __init__(self, session_id: str, paths: List[str], kernel_dir: Optional[str], number: int) -> None:
        self.session_id = session_id
        self.paths = paths
        self.kernel_dir = kernel_dir
        self.number = number
        self.pid: Optional[int] = None
        self.start_time: Optional[int] = None
        self.ports: List[int] = []
        self.ports_attached = False
        self.registered = False
        self.closed = False
        self.interval = 10.0
        self.warned_at: Optional[str] = None  # the last warning logged (its "at")

    def to_info(self) -> Dict[str, Any]:
        return {
            "session_id": self.session_id,
            "registered": self.registered,
            "paths": self.paths,
            "kernel_dir": self.kernel_dir,
            "ports": self.ports,
            "ports_attached": self.ports_attached,
            "start_time": self.start_time,
            "launch": self.number,
            "interval": self.interval,
        }

    @classmethod
    def from_info(cls, info: Dict[str, Any]) -> "Launch":
        launch = cls(str(info["session_id"]), list(info.get("paths") or []), info.get("kernel_dir"), 0)
        launch.number = int(info.get("launch") or 0)
        launch.registered = bool(info.get("registered"))
        launch.ports = [int(p) for p in info.get("ports") or []]
        launch.ports_attached = bool(info.get("ports_attached"))
        launch.start_time = info.get("start_time")
        launch.interval = float(info.get("interval") or 10.0)
        return launch


class Keeper(threading.Thread):
    """Keeps one launch's session: registers it if that failed at launch (``required =
    false``), adds the kernel's ports once it listens on them, and heartbeats. A thread, not
    an asyncio task: a blocking KernelManager runs its event loop only inside its own calls,
    so a task would not run between them and the session would expire under a live kernel."""

    def __init__(self, prov: "ReaperProvisioner", launch: Launch, beat_now: bool = False) -> None:
        super().__init__(name=f"session-reaper-{launch.session_id}", daemon=True)
        self.prov = prov
        self.launch = launch
        self.beat_now = beat_now
        self.stopped = threading.Event()

    def stop(self) -> None:
        self.stopped.set()

    def run(self) -> None:
        try:
            self._run()
        except Exception:  # never let the thread die silently
            self.prov.log.exception("session-reaper: heartbeat thread of %s failed", self.launch.session_id)

    def _run(self) -> None:
        prov, launch, log = self.prov, self.launch, self.prov.log
        client = prov.reaper_client()
        start = time.monotonic()
        ports_deadline = start + prov.wait_ports
        next_ports = start
        next_beat = start + _jitter(launch.interval) if launch.registered and not self.beat_now else start
        backoff = 0.1
        unreachable_since: Optional[float] = None

        def unreachable(e: Exception) -> float:
            nonlocal backoff, unreachable_since
            if unreachable_since is None:
                unreachable_since = time.monotonic()
                log.warning("session-reaper: daemon unreachable for %s (%s); retrying", launch.session_id, e)
            delay = backoff
            backoff = min(backoff * 2, 5.0)
            return delay

        def reachable() -> None:
            nonlocal backoff, unreachable_since
            if unreachable_since is not None:
                log.info(
                    "session-reaper: daemon reachable again for %s after %.1f s",
                    launch.session_id,
                    time.monotonic() - unreachable_since,
                )
            backoff, unreachable_since = 0.1, None

        while not self.stopped.is_set():
            now = time.monotonic()
            if not launch.registered:
                try:
                    session = client.register(prov.register_body(launch))
                except (ReaperUnreachable, ReaperApiError) as e:
                    if isinstance(e, ReaperApiError) and not e.retryable:
                        log.error(
                            "session-reaper: kernel %s runs unregistered: the daemon refused it (%s)",
                            prov.kernel_id,
                            e,
                        )
                        return
                    self.stopped.wait(unreachable(e))
                    continue
                reachable()
                launch.registered = True
                launch.interval = prov.interval_for(session)
                log.warning("session-reaper: kernel %s registered late as %s", prov.kernel_id, launch.session_id)
                next_beat = time.monotonic() + _jitter(launch.interval)
                continue

            if launch.ports and not launch.ports_attached and now >= next_ports:
                if now > ports_deadline:
                    log.warning(
                        "session-reaper: kernel %s did not listen on its ports %s within %s s: they are not "
                        "part of session %s (the daemon will not verify them free)",
                        prov.kernel_id,
                        launch.ports,
                        prov.wait_ports,
                        launch.session_id,
                    )
                    launch.ports = []
                elif not set(launch.ports) <= listening_ports():
                    next_ports = now + 0.1
                else:
                    try:
                        client.update(launch.session_id, ports=launch.ports)
                        launch.ports_attached = True
                        reachable()
                        log.debug("session-reaper: ports %s added to %s", launch.ports, launch.session_id)
                    except ReaperUnreachable as e:
                        next_ports = now + unreachable(e)
                    except ReaperApiError as e:
                        if e.code == "SR_PORT_NOT_OWNED":
                            next_ports = now + 0.2  # listening, but maybe not yet by the kernel's tree
                        elif e.code == "SR_ROUTE_NOT_FOUND":
                            log.warning(
                                "session-reaper: the daemon has no PATCH /v1/sessions/{id} (too old): the "
                                "kernel's ports are not part of session %s",
                                launch.session_id,
                            )
                            launch.ports = []
                        elif e.status in (404, 409, 410):
                            self._ended(client, e)
                            return
                        elif e.retryable:
                            next_ports = now + unreachable(e)
                        else:
                            log.error("session-reaper: could not add ports to %s: %s", launch.session_id, e)
                            launch.ports = []

            if now >= next_beat:
                try:
                    answer = client.heartbeat(launch.session_id)
                    reachable()
                    self._warned(answer)
                    next_beat = time.monotonic() + _jitter(launch.interval)
                except ReaperUnreachable as e:
                    next_beat = now + min(unreachable(e), launch.interval)
                except ReaperApiError as e:
                    if e.status in (404, 409, 410):
                        self._ended(client, e)
                        return
                    if e.retryable:
                        next_beat = now + min(unreachable(e), launch.interval)
                    else:
                        log.error("session-reaper: heartbeat of %s refused: %s", launch.session_id, e)
                        next_beat = now + launch.interval

            wake = next_beat
            if launch.ports and not launch.ports_attached:
                wake = min(wake, next_ports)
            self.stopped.wait(max(0.0, wake - time.monotonic()))

    def _warned(self, answer: Any) -> None:
        """Logs a warning the heartbeat's answer carries, once per warning (its ``at``)."""
        w = answer.get("warning") if isinstance(answer, dict) else None
        if not isinstance(w, dict) or w.get("at") == self.launch.warned_at:
            return
        self.launch.warned_at = w.get("at")
        self.prov.log.warning(
            "session-reaper: kernel %s (session %s) will be reclaimed at %s (reason %s) unless it is "
            "busy first%s",
            self.prov.kernel_id,
            self.launch.session_id,
            w.get("deadline"),
            w.get("reason"),
            " or extended (await provisioner.extend(seconds))" if w.get("reason") == "idle_timeout" else "",
        )

    def _ended(self, client: ReaperClient, e: ReaperApiError) -> None:
        """The daemon no longer takes this session (409: it is being reaped; 410: reaped and purged; 404: unknown)."""
        launch, log = self.launch, self.prov.log
        if launch.closed or self.stopped.is_set():
            return  # we closed it ourselves
        # The refusal names it (a fence's or a tombstone's detail); else the session does.
        reason = str(e.detail.get("reason") or "?")
        if reason == "?":
            try:
                reason = str(client.get(launch.session_id).get("reason"))
            except Exception:
                pass
        log.warning(
            "session-reaper: the daemon ended session %s of kernel %s (%s, reason %s): the kernel is being "
            "terminated",
            launch.session_id,
            self.prov.kernel_id,
            e.code,
            reason,
        )


# --- the provisioner --------------------------------------------------------------------


class ReaperProvisioner(LocalProvisioner):  # type: ignore[misc]
    """LocalProvisioner whose kernels are session-reaper sessions (see the module doc)."""

    socket = Unicode(
        "",
        config=True,
        help="The daemon's unix socket; default $REAPER_SOCKET, else /run/session-reaper/reaper.sock "
        "if it exists, else ./reaper.sock.",
    )
    required = Bool(
        True,
        config=True,
        help="Refuse to run a kernel the daemon did not register (the start fails and the kernel is "
        "killed). False: start it anyway with a warning; registration is retried in the background "
        "while the daemon is unreachable.",
    )
    profile = Unicode("", config=True, help="The daemon profile of the sessions (default: the daemon's).")
    owner = Unicode("", config=True, help="The sessions' owner field (default: the server's user name).")
    bind_to_server = Bool(
        True,
        config=True,
        help="Register the server process as the session's owner: the daemon reaps its kernels "
        "(owner_gone) the moment it exits. False: kernels outlive the server until their heartbeat "
        "timeout, so that a restarted server can re-attach them.",
    )
    heartbeat_timeout = Integer(0, config=True, help="heartbeatTimeoutSec (0: the profile's).")
    heartbeat_interval = Float(0.0, config=True, help="Seconds between heartbeats (0: a third of the timeout).")
    kernel_runtime_dir = Bool(
        True,
        config=True,
        help="Give each kernel a runtime directory of its own (its JUPYTER_RUNTIME_DIR), registered "
        "as a session path and deleted at the reap.",
    )
    kernel_dir_root = Unicode(
        "",
        config=True,
        help="Where the kernels' own directories are made (default: the connection file's directory).",
    )
    private_tmp = Bool(
        False,
        config=True,
        help="Also point the kernel's TMPDIR into its own directory, so the temp files it makes are "
        "deleted with it.",
    )
    labels = DictTrait(config=True, help="Extra labels for every session.")
    wait_ports = Float(60.0, config=True, help="How long to wait for the kernel to listen on its ports.")
    register_timeout = Float(
        10.0, config=True, help="How long registration retries an unreachable or busy daemon."
    )
    restart_reap_timeout = Float(
        30.0, config=True, help="On a restart, how long to wait for the old session's cleanup."
    )
    request_timeout = Float(5.0, config=True, help="Each API request's timeout.")

    _launch: Optional[Launch] = None
    _keeper: Optional[Keeper] = None
    _launches = 0

    # --- helpers ---

    @property
    def session_id(self) -> Optional[str]:
        """The current launch's session id (None before the first launch)."""
        return self._launch.session_id if self._launch else None

    def socket_path(self) -> str:
        return self.socket or default_socket()

    def reaper_client(self) -> ReaperClient:
        return ReaperClient(self.socket_path(), self.request_timeout)

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Blocking socket I/O off the server's event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))

    async def extend(self, seconds: int) -> Dict[str, Any]:
        """Keeps the kernel's session at least ``seconds`` from now however idle (the user asked
        to keep the notebook): passed on to the daemon (POST /v1/sessions/{id}/extend), up to the
        profile's max_extend_sec, never past the session's max lifetime. Raises ReaperApiError on
        a refusal (``SR_EXTEND_ABOVE_MAX`` names the cap), RuntimeError before a launch."""
        session_id = self.session_id
        if session_id is None:
            raise RuntimeError("no kernel has been launched: nothing to extend")
        return await self._in_thread(self.reaper_client().extend, session_id, seconds)

    def interval_for(self, session: Dict[str, Any]) -> float:
        if self.heartbeat_interval > 0:
            return self.heartbeat_interval
        return max(0.2, float(session.get("heartbeatTimeoutSec") or 30) / 3)

    def register_body(self, launch: Launch) -> Dict[str, Any]:
        owner = self.owner
        if not owner:
            try:
                owner = getpass.getuser()
            except Exception:
                owner = str(os.getuid())
        labels = {
            "jupyter.kernel-id": str(self.kernel_id or "")[:256],
            "jupyter.kernel-name": str(getattr(self.parent, "kernel_name", "") or "")[:256],
            "jupyter.launch": str(launch.number),
        }
        labels.update({str(k): str(v) for k, v in (self.labels or {}).items()})
        body: Dict[str, Any] = {
            "id": launch.session_id,
            "engine": {"pid": launch.pid},
            "owner": owner[:256],
            "paths": launch.paths,
            "labels": labels,
        }
        if self.bind_to_server:
            body["ownerPid"] = os.getpid()
        if self.profile:
            body["profile"] = self.profile
        if self.heartbeat_timeout > 0:
            body["heartbeatTimeoutSec"] = self.heartbeat_timeout
        return body

    def _register_now(self, launch: Launch) -> Dict[str, Any]:
        """Registers, retrying an unreachable or busy daemon for up to register_timeout."""
        client = self.reaper_client()
        end = time.monotonic() + self.register_timeout
        delay = 0.1
        while True:
            try:
                return client.register(self.register_body(launch))
            except (ReaperUnreachable, ReaperApiError) as e:
                if isinstance(e, ReaperApiError) and not e.retryable:
                    raise
                if time.monotonic() + delay > end:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _start_keeper(self, launch: Launch, beat_now: bool = False) -> None:
        self._stop_keeper()
        self._keeper = Keeper(self, launch, beat_now)
        self._keeper.start()

    def _stop_keeper(self) -> None:
        if self._keeper is not None:
            self._keeper.stop()
            self._keeper = None

    def _wait_reaped(self, session_id: str, timeout: float) -> Optional[Dict[str, Any]]:
        client = self.reaper_client()
        end = time.monotonic() + timeout
        while True:
            try:
                session = client.get(session_id)
            except ReaperUnreachable as e:
                self.log.warning("session-reaper: cannot follow the cleanup of %s: %s", session_id, e)
                return None
            except ReaperApiError as e:
                self.log.warning("session-reaper: cannot follow the cleanup of %s: %s", session_id, e)
                return None
            if session.get("state") == "reaped":
                return session
            if time.monotonic() > end:
                self.log.warning(
                    "session-reaper: session %s still %s after %s s; restarting the kernel anyway",
                    session_id,
                    session.get("state"),
                    timeout,
                )
                return None
            time.sleep(0.05)

    async def _close(self) -> None:
        """DELETE the current launch's session, once. The daemon then waits (its profile's
        grace period) for the kernel to exit, terminates whatever is left of its tree,
        verifies its ports free and deletes its paths."""
        launch = self._launch
        if launch is None or launch.closed:
            return
        launch.closed = True
        self._stop_keeper()
        if not launch.registered:
            return
        try:
            await self._in_thread(self.reaper_client().close, launch.session_id)
            self.log.debug("session-reaper: closed session %s", launch.session_id)
        except ReaperApiError as e:
            if e.status == 409:
                self.log.debug("session-reaper: session %s was already ending (%s)", launch.session_id, e)
            else:
                self.log.warning("session-reaper: could not close session %s: %s", launch.session_id, e)
        except ReaperUnreachable as e:
            self.log.warning(
                "session-reaper: could not close session %s (%s); the daemon reaps it when it sees the "
                "kernel gone",
                launch.session_id,
                e,
            )

    # --- launch ---

    async def pre_launch(self, **kwargs: Any) -> Dict[str, Any]:
        kwargs = await super().pre_launch(**kwargs)
        self._launches += 1
        session_id = _session_id(str(self.kernel_id or "kernel"), secrets.token_hex(4))
        km = self.parent
        conn = getattr(km, "connection_file", "") if km is not None else ""
        paths: List[str] = []
        if conn:
            # The file the kernel was told to read ({connection_file} is its realpath).
            conn = os.path.realpath(conn)
            paths.append(conn)
        env = kwargs.setdefault("env", dict(os.environ))
        kernel_dir = None
        if self.kernel_runtime_dir:
            root = self.kernel_dir_root or (os.path.dirname(conn) if conn else "")
            if root:
                # Hidden, and free of the kernel id: `jupyter console --existing ID` globs
                # `*ID*` in the runtime dir and must find the connection file only.
                kernel_dir = os.path.join(os.path.realpath(root), f".reaper-{session_id}")
                os.makedirs(os.path.dirname(kernel_dir), mode=0o700, exist_ok=True)
                os.mkdir(kernel_dir, 0o700)  # fresh: nothing else is ever below it
                paths.append(kernel_dir)
                env["JUPYTER_RUNTIME_DIR"] = kernel_dir
                if self.private_tmp:
                    os.mkdir(os.path.join(kernel_dir, "tmp"), 0o700)
                    env["TMPDIR"] = os.path.join(kernel_dir, "tmp")
        env[SESSION_COOKIE] = session_id
        self._launch = Launch(session_id, paths, kernel_dir, self._launches)
        return kwargs

    async def launch_kernel(self, cmd: List[str], **kwargs: Any) -> Dict[str, Any]:
        try:
            info = await super().launch_kernel(cmd, **kwargs)
        except BaseException:
            if self._launch is not None and self._launch.kernel_dir:
                shutil.rmtree(self._launch.kernel_dir, ignore_errors=True)
            self._launch = None
            raise
        launch = self._launch
        if launch is None:  # launched without our pre_launch: a session all the same
            launch = self._launch = Launch(
                _session_id(str(self.kernel_id or "kernel"), secrets.token_hex(4)), [], None, self._launches
            )
        launch.pid = self.pid
        launch.start_time = proc_start_time(self.pid) if self.pid else None
        if info.get("transport", "tcp") == "tcp":
            launch.ports = sorted({int(info[n]) for n in PORT_NAMES if info.get(n)})
        try:
            session = await self._in_thread(self._register_now, launch)
        except (ReaperUnreachable, ReaperApiError) as e:
            if self.required:
                self.log.error(
                    "session-reaper: kernel %s not started: the daemon at %s did not register it (%s)",
                    self.kernel_id,
                    self.socket_path(),
                    e,
                )
                await self._abort_launch(launch)
                raise RuntimeError(
                    f"session-reaper: kernel {self.kernel_id} not started: the daemon at {self.socket_path()} "
                    f"did not register it ({e}); {self._refusal_hint(e, launch)}"
                ) from e
            retry = not isinstance(e, ReaperApiError) or e.retryable
            self.log.warning(
                "session-reaper: kernel %s runs UNREGISTERED: the daemon at %s did not register it (%s)%s",
                self.kernel_id,
                self.socket_path(),
                e,
                "; retrying in the background" if retry else "",
            )
            if retry:
                self._start_keeper(launch)
            return info
        launch.registered = True
        launch.interval = self.interval_for(session)
        self.log.info(
            "session-reaper: kernel %s (pid %s) is session %s", self.kernel_id, launch.pid, launch.session_id
        )
        self._start_keeper(launch)
        return info

    def _refusal_hint(self, e: Exception, launch: Launch) -> str:
        """What to change, from why the daemon did not register the kernel: a daemon that is
        down and a daemon that refused a path or a port need different fixes."""
        code = getattr(e, "code", None)
        if not isinstance(e, ReaperApiError):
            return (
                "start the daemon (or point kernel_provisioner.config.socket or $REAPER_SOCKET at it), "
                "or set kernel_provisioner.config.required = false to run kernels unregistered while "
                "it is unreachable"
            )
        if code in ("SR_PATH_OUTSIDE_ROOT", "SR_PATH_OTHER_FS", "SR_PATH_SYMLINK", "SR_PATH_NOT_OWNED"):
            where = launch.kernel_dir or (launch.paths[0] if launch.paths else "the kernel's directory")
            return (
                f"the daemon refused the kernel's directory {where}: add its parent to the profile's "
                "allowed_roots in the daemon's config (a real directory, not a symbolic link, on the same "
                "file system, owned by the kernel's user), or point kernel_provisioner.config.kernel_dir_root "
                "(or JUPYTER_RUNTIME_DIR) at a directory below an allowed root, or set "
                "kernel_provisioner.config.kernel_runtime_dir = false"
            )
        if code == "SR_PORT_NOT_OWNED":
            return "the kernel did not hold its ports when it registered: raise kernel_provisioner.config.wait_ports"
        if code == "SR_UNKNOWN_PROFILE":
            return "set kernel_provisioner.config.profile to a profile the daemon's config defines"
        if e.retryable:
            return (
                "the daemon is busy or cannot write its store: retry, or set kernel_provisioner.config.required "
                "= false to run kernels unregistered meanwhile"
            )
        return f"see the daemon's error code {code} in session-reaper's docs/api.md"

    async def _abort_launch(self, launch: Launch) -> None:
        """The kernel of a refused launch (required mode): killed, its own directory removed."""
        try:
            await super().kill()
        except OSError:
            pass
        try:
            await asyncio.wait_for(super().wait(), 10)
        except asyncio.TimeoutError:
            self.log.error("session-reaper: kernel %s (pid %s) did not die", self.kernel_id, launch.pid)
        if launch.kernel_dir:
            shutil.rmtree(launch.kernel_dir, ignore_errors=True)
        self._launch = None

    # --- shutdown: close first, then let LocalProvisioner stop the kernel ---

    async def send_signal(self, signum: int) -> None:
        # KernelManager.shutdown_kernel sets shutting_down, then interrupts the kernel before
        # it sends the shutdown request: the first moment a shutdown is known, with the
        # kernel still running.
        if getattr(self.parent, "shutting_down", False):
            await self._close()
        await super().send_signal(signum)

    async def shutdown_requested(self, restart: bool = False) -> None:
        await self._close()
        await super().shutdown_requested(restart=restart)

    async def terminate(self, restart: bool = False) -> None:
        await self._close()
        await super().terminate(restart=restart)

    async def kill(self, restart: bool = False) -> None:
        await self._close()
        await super().kill(restart=restart)

    async def cleanup(self, restart: bool = False) -> None:
        launch = self._launch
        await self._close()
        if launch is not None:
            if launch.registered and restart:
                # The next kernel reuses the connection file and, with cached ports, the ports:
                # the old session's cleanup (which deletes that file and verifies those ports
                # free) must be over before it starts.
                await self._in_thread(self._wait_reaped, launch.session_id, self.restart_reap_timeout)
            elif not launch.registered and launch.kernel_dir:
                shutil.rmtree(launch.kernel_dir, ignore_errors=True)
        self._launch = None
        await super().cleanup(restart=restart)

    # --- persistence: a restarted server re-attaches ---

    async def get_provisioner_info(self) -> Dict[str, Any]:
        info = await super().get_provisioner_info()
        if self._launch is not None:
            info[INFO_KEY] = self._launch.to_info()
        return info

    async def load_provisioner_info(self, provisioner_info: Dict[str, Any]) -> None:
        await super().load_provisioner_info(provisioner_info)
        saved = provisioner_info.get(INFO_KEY)
        launch = Launch.from_info(saved) if isinstance(saved, dict) else None
        start_time = launch.start_time if launch else None
        if self.pid and self.process is None:
            if proc_alive(self.pid, start_time):
                self.process = AttachedKernel(self.pid, start_time)
            else:
                self.log.warning("session-reaper: kernel %s (pid %s) is gone", self.kernel_id, self.pid)
        if launch is None:
            return
        launch.pid = self.pid
        self._launch = launch
        self._launches = max(self._launches, launch.number)
        if self.process is None:
            launch.closed = True  # nothing left to keep; the daemon saw the kernel go
            return
        if launch.registered:
            try:
                session = await self._in_thread(self.reaper_client().get, launch.session_id)
            except ReaperUnreachable as e:
                self.log.warning("session-reaper: re-attaching %s: %s; retrying", launch.session_id, e)
            except ReaperApiError as e:
                self.log.warning("session-reaper: cannot re-attach %s: %s", launch.session_id, e)
                launch.closed = True
                return
            else:
                if session.get("state") != "live":
                    self.log.warning(
                        "session-reaper: session %s of kernel %s is %s (%s): not re-attached",
                        launch.session_id,
                        self.kernel_id,
                        session.get("state"),
                        session.get("reason"),
                    )
                    launch.closed = True
                    return
                launch.interval = self.interval_for(session)
                owner = (session.get("ownerPid") or {}).get("pid")
                if owner is not None and owner != os.getpid():
                    self.log.warning(
                        "session-reaper: session %s stays bound to process %s, the server that started "
                        "kernel %s: the daemon reaps it when that process exits",
                        launch.session_id,
                        owner,
                        self.kernel_id,
                    )
                self.log.info("session-reaper: re-attached kernel %s to session %s", self.kernel_id, launch.session_id)
        # At once: the server that heartbeated it is gone, its last beat may be a while back.
        self._start_keeper(launch, beat_now=True)


__all__ = ["ReaperProvisioner", "AttachedKernel", "SESSION_COOKIE"]
