/*
 * reaper_native: the few Linux system calls Node 20 does not expose, for session-reaper.
 *
 *   pidfdOpen(pid) -> fd             pidfd_open(2): a handle on one process, immune to pid reuse
 *   pidfdSendSignal(fd, signo)       pidfd_send_signal(2): signals exactly that process
 *   closeFd(fd)                      close(2)
 *   watchExit(fd, callback) -> h     calls callback once, on the event loop, when the process
 *                                    exits (the pidfd becomes readable): no polling
 *   unwatch(h)                       stops watching (idempotent)
 *   openDirAt(dirfd, name) -> fd     openat(2) with O_DIRECTORY | O_NOFOLLOW: one path component,
 *                                    never through a symlink (dirfd -100 = AT_FDCWD)
 *   sendDatagram(path, buffer)       one unix datagram (sd_notify; Node has no AF_UNIX SOCK_DGRAM);
 *                                    a path starting with '@' is in the abstract namespace
 *   peerCred(fd) -> {pid,uid,gid,groups}
 *                                    SO_PEERCRED and SO_PEERGROUPS of a connected unix socket: who
 *                                    is on the other end, as the kernel saw it at connect(2)
 *   flockExclusive(fd) -> bool       flock(2) LOCK_EX | LOCK_NB: true if taken, false if another
 *                                    open file description holds it (one daemon per database)
 *   spawnAt(file, argv, env, cwdFd, stdio, uid, gid) -> Promise<{pid, pidfd}>
 *                                    runs a program the way posix_spawn(3) does: clone(2) with
 *                                    CLONE_VM | CLONE_VFORK, so the daemon's page tables are not
 *                                    copied (a fork costs ~10 ms per 200 MB of the daemon's
 *                                    memory), on a libuv pool thread, not the event loop; the
 *                                    child takes stdio[0..2] as fds 0-2, fchdirs to cwdFd,
 *                                    closes every fd above 2, resets every signal, and with
 *                                    uid >= 0 drops its supplementary groups and takes gid and
 *                                    uid before execve
 *   waitExited(pid) -> {code, signal} | null
 *                                    waitpid(2) WNOHANG for a child spawnAt started
 *   memfdCreate(name) -> fd          memfd_create(2): a file in memory (a child's stderr)
 *   procEventsOpen(callback)         subscribes to the kernel's process events connector (fork,
 *                                    exit) on a thread of its own; callback runs on the event loop
 *                                    once per batch (see "process events" below)
 *   procEventsDrain(flush) -> {records, overruns, dropped, events}
 *                                    takes the batch; flush also reads what the kernel queued
 *   procEventsClose()                unsubscribes and stops the thread
 *
 * Errors are thrown as Error objects whose `code` is the errno name ("ESRCH", "ENOSYS", ...),
 * like Node's own fs errors, so callers can fall back when the kernel lacks pidfd (< 5.3).
 * Kept deliberately small: every function but spawnAt is a thin wrapper over one system call;
 * spawnAt is what glibc's posix_spawn does, plus the credentials (which it cannot set).
 */
#define _GNU_SOURCE /* struct ucred */
#include <node_api.h>
#include <uv.h>

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <sched.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif

static const char *errno_name(int err) {
  switch (err) {
    case ESRCH: return "ESRCH";
    case ENOSYS: return "ENOSYS";
    case EPERM: return "EPERM";
    case EINVAL: return "EINVAL";
    case EBADF: return "EBADF";
    case EMFILE: return "EMFILE";
    case ENFILE: return "ENFILE";
    case ENOMEM: return "ENOMEM";
    case EACCES: return "EACCES";
    case ELOOP: return "ELOOP";
    case ENOTDIR: return "ENOTDIR";
    case ENOENT: return "ENOENT";
    case ECONNREFUSED: return "ECONNREFUSED";
    case EAGAIN: return "EAGAIN";
    case ENOTSOCK: return "ENOTSOCK";
    case ENOPROTOOPT: return "ENOPROTOOPT";
    case ERANGE: return "ERANGE";
    case E2BIG: return "E2BIG";
    case ECANCELED: return "ECANCELED";
    case ECHILD: return "ECHILD";
    case EPROTONOSUPPORT: return "EPROTONOSUPPORT";
    case ETIMEDOUT: return "ETIMEDOUT";
    case EBUSY: return "EBUSY";
    default: return "EUNKNOWN";
  }
}

static napi_value throw_errno(napi_env env, int err, const char *call) {
  char msg[160];
  snprintf(msg, sizeof msg, "%s: %s", call, strerror(err));
  napi_throw_error(env, errno_name(err), msg);
  return NULL;
}

/* Reads argument i as an int32; throws a TypeError and returns 0 on failure. */
static int int_arg(napi_env env, napi_value *argv, size_t argc, size_t i, int32_t *out) {
  napi_valuetype t;
  if (i >= argc || napi_typeof(env, argv[i], &t) != napi_ok || t != napi_number ||
      napi_get_value_int32(env, argv[i], out) != napi_ok) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "expected an integer argument");
    return 0;
  }
  return 1;
}

static napi_value pidfd_open_js(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  int32_t pid;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (!int_arg(env, argv, argc, 0, &pid)) return NULL;
  if (pid <= 0) return throw_errno(env, EINVAL, "pidfd_open");
  long fd = syscall(SYS_pidfd_open, (pid_t)pid, 0); /* the fd is O_CLOEXEC */
  if (fd < 0) return throw_errno(env, errno, "pidfd_open");
  napi_value result;
  napi_create_int32(env, (int32_t)fd, &result);
  return result;
}

static napi_value pidfd_send_signal_js(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  int32_t fd, signo;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (!int_arg(env, argv, argc, 0, &fd) || !int_arg(env, argv, argc, 1, &signo)) return NULL;
  if (syscall(SYS_pidfd_send_signal, fd, signo, NULL, 0) < 0) return throw_errno(env, errno, "pidfd_send_signal");
  return NULL;
}

static napi_value close_fd_js(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  int32_t fd;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (!int_arg(env, argv, argc, 0, &fd)) return NULL;
  if (close(fd) < 0) return throw_errno(env, errno, "close");
  return NULL;
}

/*
 * A watch lives until both the JS side let go of it (finalizer) and libuv closed its poll
 * handle: whichever comes last frees it, so neither side can touch freed memory.
 */
typedef struct {
  uv_poll_t poll;
  napi_env env;
  napi_ref callback;
  napi_async_context context;
  int closing;   /* uv_close requested */
  int closed;    /* uv_close callback ran */
  int finalized; /* the JS external was collected */
} exit_watch;

static void release_js(exit_watch *w) {
  if (w->callback != NULL) {
    napi_delete_reference(w->env, w->callback);
    w->callback = NULL;
  }
  if (w->context != NULL) {
    napi_async_destroy(w->env, w->context);
    w->context = NULL;
  }
}

static void on_closed(uv_handle_t *handle) {
  exit_watch *w = (exit_watch *)handle->data;
  w->closed = 1;
  if (w->finalized) free(w);
}

static void stop_watch(exit_watch *w) {
  if (w->closing) return;
  w->closing = 1;
  uv_poll_stop(&w->poll);
  uv_close((uv_handle_t *)&w->poll, on_closed);
}

static void on_readable(uv_poll_t *handle, int status, int events) {
  (void)events;
  exit_watch *w = (exit_watch *)handle->data;
  napi_env env = w->env;
  napi_ref ref = w->callback;
  napi_async_context context = w->context;
  w->callback = NULL;
  w->context = NULL;
  stop_watch(w);
  if (ref == NULL) return;

  napi_handle_scope scope;
  napi_open_handle_scope(env, &scope);
  napi_value callback, recv, arg, ignored;
  napi_get_reference_value(env, ref, &callback);
  napi_get_global(env, &recv); /* make_callback converts the receiver to an object */
  napi_create_int32(env, status, &arg); /* 0, or a negative libuv error */
  /* make_callback runs microtasks afterwards and reports exceptions like any Node callback. */
  napi_make_callback(env, context, recv, callback, 1, &arg, &ignored);
  napi_close_handle_scope(env, scope);
  napi_delete_reference(env, ref);
  napi_async_destroy(env, context);
}

static void finalize_watch(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  exit_watch *w = (exit_watch *)data;
  release_js(w);
  stop_watch(w);
  w->finalized = 1;
  if (w->closed) free(w);
}

static napi_value watch_exit_js(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  int32_t fd;
  napi_valuetype t;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (!int_arg(env, argv, argc, 0, &fd)) return NULL;
  if (argc < 2 || napi_typeof(env, argv[1], &t) != napi_ok || t != napi_function) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "expected a callback");
    return NULL;
  }
  uv_loop_t *loop;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok) {
    napi_throw_error(env, "EUNKNOWN", "no event loop");
    return NULL;
  }
  exit_watch *w = calloc(1, sizeof *w);
  if (w == NULL) return throw_errno(env, ENOMEM, "watchExit");
  w->env = env;
  int rc = uv_poll_init(loop, &w->poll, fd);
  if (rc != 0) {
    free(w);
    napi_throw_error(env, uv_err_name(rc), uv_strerror(rc));
    return NULL;
  }
  w->poll.data = w;
  napi_value name;
  napi_create_string_utf8(env, "reaper.watchExit", NAPI_AUTO_LENGTH, &name);
  napi_async_init(env, NULL, name, &w->context);
  napi_create_reference(env, argv[1], 1, &w->callback);
  rc = uv_poll_start(&w->poll, UV_READABLE, on_readable);
  if (rc != 0) {
    release_js(w);
    w->closing = 1;
    w->finalized = 1;
    uv_close((uv_handle_t *)&w->poll, on_closed);
    napi_throw_error(env, uv_err_name(rc), uv_strerror(rc));
    return NULL;
  }
  /* A watch must not keep the daemon's event loop alive on its own. */
  uv_unref((uv_handle_t *)&w->poll);
  napi_value external;
  napi_create_external(env, w, finalize_watch, NULL, &external);
  return external;
}

static napi_value unwatch_js(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  void *data = NULL;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 1 || napi_get_value_external(env, argv[0], &data) != napi_ok || data == NULL) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "expected a watch handle");
    return NULL;
  }
  exit_watch *w = (exit_watch *)data;
  release_js(w);
  stop_watch(w);
  return NULL;
}

static napi_value open_dir_at_js(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  int32_t dirfd;
  char name[4096];
  size_t len = 0;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (!int_arg(env, argv, argc, 0, &dirfd)) return NULL;
  if (argc < 2 || napi_get_value_string_utf8(env, argv[1], name, sizeof name, &len) != napi_ok || len == 0 ||
      len >= sizeof name - 1) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "expected a non-empty name");
    return NULL;
  }
  if (strlen(name) != len) return throw_errno(env, EINVAL, "openat"); /* an embedded NUL */
  int fd = openat(dirfd == -100 ? AT_FDCWD : dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return throw_errno(env, errno, "openat");
  napi_value result;
  napi_create_int32(env, fd, &result);
  return result;
}

static napi_value send_datagram_js(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  struct sockaddr_un addr;
  size_t len = 0;
  void *data = NULL;
  size_t size = 0;
  bool is_buffer = false;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  memset(&addr, 0, sizeof addr);
  addr.sun_family = AF_UNIX;
  if (argc < 2 || napi_get_value_string_utf8(env, argv[0], addr.sun_path, sizeof addr.sun_path, &len) != napi_ok ||
      len == 0 || len >= sizeof addr.sun_path - 1 || napi_is_buffer(env, argv[1], &is_buffer) != napi_ok || !is_buffer ||
      napi_get_buffer_info(env, argv[1], &data, &size) != napi_ok) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "expected a socket path and a Buffer");
    return NULL;
  }
  if (addr.sun_path[0] == '@') addr.sun_path[0] = '\0'; /* abstract namespace */
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return throw_errno(env, errno, "socket");
  socklen_t addr_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len);
  ssize_t sent = sendto(fd, data, size, MSG_NOSIGNAL, (struct sockaddr *)&addr, addr_len);
  int err = errno;
  close(fd);
  if (sent < 0) return throw_errno(env, err, "sendto");
  return NULL;
}

static napi_value set_int(napi_env env, napi_value obj, const char *key, int64_t v) {
  napi_value n;
  napi_create_int64(env, v, &n);
  napi_set_named_property(env, obj, key, n);
  return obj;
}

/*
 * The kernel records the peer's credentials when it connects, so they cannot be forged by
 * the caller and do not change if it later calls setuid. SO_PEERGROUPS (Linux 4.13) gives
 * its supplementary groups at that moment; an older kernel answers an empty list (ENOPROTOOPT).
 */
static napi_value peer_cred_js(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  int32_t fd;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (!int_arg(env, argv, argc, 0, &fd)) return NULL;
  struct ucred cred;
  socklen_t len = sizeof cred;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return throw_errno(env, errno, "getsockopt(SO_PEERCRED)");
  if (len != sizeof cred) return throw_errno(env, EINVAL, "getsockopt(SO_PEERCRED)");
  gid_t groups[256];
  socklen_t glen = sizeof groups;
  int ngroups = 0;
#ifdef SO_PEERGROUPS
  if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &glen) == 0) {
    ngroups = (int)(glen / sizeof(gid_t));
  } else if (errno == ERANGE) {
    /* More than 256 supplementary groups: refuse rather than judge on a truncated list. */
    return throw_errno(env, ERANGE, "getsockopt(SO_PEERGROUPS)");
  } else if (errno != ENOPROTOOPT) {
    return throw_errno(env, errno, "getsockopt(SO_PEERGROUPS)");
  }
#endif
  napi_value result, list;
  napi_create_object(env, &result);
  set_int(env, result, "pid", cred.pid);
  set_int(env, result, "uid", cred.uid);
  set_int(env, result, "gid", cred.gid);
  napi_create_array_with_length(env, (size_t)ngroups, &list);
  for (int i = 0; i < ngroups; i++) {
    napi_value g;
    napi_create_int64(env, groups[i], &g);
    napi_set_element(env, list, (uint32_t)i, g);
  }
  napi_set_named_property(env, result, "groups", list);
  return result;
}

static napi_value flock_exclusive_js(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  int32_t fd;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (!int_arg(env, argv, argc, 0, &fd)) return NULL;
  int rc;
  do rc = flock(fd, LOCK_EX | LOCK_NB); while (rc < 0 && errno == EINTR);
  if (rc < 0 && errno != EWOULDBLOCK) return throw_errno(env, errno, "flock");
  napi_value result;
  napi_get_boolean(env, rc == 0, &result);
  return result;
}

/* ---- spawnAt: a vfork-style spawn (what glibc's posix_spawn does, plus credentials) ---- */

#define SPAWN_STACK (64 * 1024)

typedef struct {
  char *file;
  char **argv;
  char **envp;
  int cwd_fd;
  int stdio[3];
  int set_ids;
  uid_t uid;
  gid_t gid;
  sigset_t mask; /* the program's signal mask, set in the child just before execve */
  int err;       /* written by the child (shared memory) when it fails before execve */
  const char *failed;
  pid_t pid;
  int pidfd;
  napi_deferred deferred;
  napi_async_work work;
} spawn_req;

/*
 * Runs in the child, on its own stack but in the daemon's memory (CLONE_VM) while the parent
 * thread is suspended (CLONE_VFORK): only raw system calls, no allocation, no locks.
 */
static int spawn_child(void *arg) {
  spawn_req *r = (spawn_req *)arg;
  /* Handlers are the daemon's code running on its memory: every signal back to its default. */
  struct sigaction dfl;
  memset(&dfl, 0, sizeof dfl);
  dfl.sa_handler = SIG_DFL;
  for (int sig = 1; sig < _NSIG; sig++) {
    if (sig == SIGKILL || sig == SIGSTOP) continue;
    syscall(SYS_rt_sigaction, sig, &dfl, NULL, _NSIG / 8);
  }
  for (int i = 0; i < 3; i++) {
    if (r->stdio[i] != i && syscall(SYS_dup3, r->stdio[i], i, 0) < 0) {
      r->failed = "dup3";
      goto fail;
    }
    if (r->stdio[i] == i && syscall(SYS_fcntl, i, F_SETFD, 0) < 0) {
      r->failed = "fcntl";
      goto fail;
    }
  }
  if (r->cwd_fd >= 0 && syscall(SYS_fchdir, r->cwd_fd) < 0) {
    r->failed = "fchdir";
    goto fail;
  }
  /* Only fds 0-2 cross into the program, whatever the daemon inherited without O_CLOEXEC. */
  syscall(SYS_close_range, 3, ~0U, 0);
  if (r->set_ids) {
    /* Raw calls: glibc's wrappers would signal the daemon's other threads to change theirs. */
    if (syscall(SYS_setgroups, 0, NULL) < 0) {
      r->failed = "setgroups";
      goto fail;
    }
    if (syscall(SYS_setresgid, r->gid, r->gid, r->gid) < 0) {
      r->failed = "setresgid";
      goto fail;
    }
    if (syscall(SYS_setresuid, r->uid, r->uid, r->uid) < 0) {
      r->failed = "setresuid";
      goto fail;
    }
  }
  syscall(SYS_rt_sigprocmask, SIG_SETMASK, &r->mask, NULL, _NSIG / 8);
  syscall(SYS_execve, r->file, r->argv, r->envp);
  r->failed = "execve";
fail:
  r->err = errno;
  syscall(SYS_exit, 127);
  return 127;
}

static void free_strings(char **list) {
  if (list == NULL) return;
  for (char **p = list; *p != NULL; p++) free(*p);
  free(list);
}

static char *string_arg(napi_env env, napi_value v) {
  size_t len = 0;
  if (napi_get_value_string_utf8(env, v, NULL, 0, &len) != napi_ok) return NULL;
  char *s = malloc(len + 1);
  if (s == NULL) return NULL;
  size_t got = 0;
  napi_get_value_string_utf8(env, v, s, len + 1, &got);
  if (strlen(s) != got) { /* an embedded NUL */
    free(s);
    return NULL;
  }
  return s;
}

/* A JS array of strings as a NULL-terminated, malloc'd list; NULL (and a TypeError) on bad input. */
static char **strings_arg(napi_env env, napi_value v) {
  bool is_array = false;
  uint32_t n = 0;
  if (napi_is_array(env, v, &is_array) != napi_ok || !is_array || napi_get_array_length(env, v, &n) != napi_ok ||
      n > 4096) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "expected an array of strings");
    return NULL;
  }
  char **list = calloc(n + 1, sizeof *list);
  if (list == NULL) return NULL;
  for (uint32_t i = 0; i < n; i++) {
    napi_value item;
    napi_valuetype t;
    if (napi_get_element(env, v, i, &item) != napi_ok || napi_typeof(env, item, &t) != napi_ok || t != napi_string ||
        (list[i] = string_arg(env, item)) == NULL) {
      free_strings(list);
      napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "expected an array of strings without NUL");
      return NULL;
    }
  }
  return list;
}

/* Runs on a libuv pool thread: the clone, the wait for execve, the pidfd. */
static void spawn_execute(napi_env env, void *data) {
  (void)env;
  spawn_req *r = (spawn_req *)data;
  r->pid = -1;
  r->pidfd = -1;
  char *stack = mmap(NULL, SPAWN_STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
  if (stack == MAP_FAILED) {
    r->err = errno;
    r->failed = "mmap";
    return;
  }
  sigset_t all, old;
  sigfillset(&all);
  sigemptyset(&r->mask); /* the program starts with no signal blocked */
  pthread_sigmask(SIG_BLOCK, &all, &old);
  pid_t pid = clone(spawn_child, stack + SPAWN_STACK, CLONE_VM | CLONE_VFORK | SIGCHLD, r);
  int clone_err = errno;
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  munmap(stack, SPAWN_STACK);
  if (pid < 0) {
    r->err = clone_err;
    r->failed = "clone";
    return;
  }
  if (r->err != 0) {
    /* The child failed before execve and exited: reap it here; r->err says why. */
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
    }
    return;
  }
  long pidfd = syscall(SYS_pidfd_open, pid, 0);
  if (pidfd < 0) {
    r->err = errno;
    r->failed = "pidfd_open";
    kill(pid, SIGKILL);
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
    }
    return;
  }
  r->pid = pid;
  r->pidfd = (int)pidfd;
}

static void spawn_complete(napi_env env, napi_status status, void *data) {
  spawn_req *r = (spawn_req *)data;
  napi_value result;
  if (status == napi_ok && r->err == 0) {
    napi_create_object(env, &result);
    set_int(env, result, "pid", r->pid);
    set_int(env, result, "pidfd", r->pidfd);
    napi_resolve_deferred(env, r->deferred, result);
  } else {
    int err = status == napi_ok ? r->err : ECANCELED;
    char msg[160];
    snprintf(msg, sizeof msg, "%s: %s", r->failed != NULL ? r->failed : "spawn", strerror(err));
    napi_value code, text;
    napi_create_string_utf8(env, errno_name(err), NAPI_AUTO_LENGTH, &code);
    napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &text);
    napi_create_error(env, code, text, &result);
    napi_reject_deferred(env, r->deferred, result);
  }
  napi_delete_async_work(env, r->work);
  free(r->file);
  free_strings(r->argv);
  free_strings(r->envp);
  free(r);
}

/*
 * spawnAt(file, argv, env, cwdFd, [stdin, stdout, stderr], uid, gid) -> Promise<{pid, pidfd}>:
 * uid < 0 keeps ours. The clone runs on a libuv pool thread: the event loop does not even
 * wait for the program's execve.
 */
static napi_value spawn_at_js(napi_env env, napi_callback_info info) {
  size_t argc = 7;
  napi_value argv[7];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int32_t cwd_fd, uid, gid;
  if (argc < 7) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "spawnAt takes 7 arguments");
    return NULL;
  }
  if (!int_arg(env, argv, argc, 3, &cwd_fd) || !int_arg(env, argv, argc, 5, &uid) ||
      !int_arg(env, argv, argc, 6, &gid))
    return NULL;
  if (uid >= 0 && gid < 0) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "a uid needs a gid");
    return NULL;
  }
  int stdio[3];
  for (uint32_t i = 0; i < 3; i++) {
    napi_value item;
    int32_t fd;
    if (napi_get_element(env, argv[4], i, &item) != napi_ok || !int_arg(env, &item, 1, 0, &fd)) return NULL;
    if (fd < 0) {
      napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "stdio takes three open fds");
      return NULL;
    }
    stdio[i] = fd;
  }
  spawn_req *r = calloc(1, sizeof *r);
  if (r == NULL) return throw_errno(env, ENOMEM, "spawnAt");
  r->cwd_fd = cwd_fd;
  r->set_ids = uid >= 0;
  r->uid = (uid_t)uid;
  r->gid = (gid_t)(gid >= 0 ? gid : 0);
  memcpy(r->stdio, stdio, sizeof stdio);
  napi_valuetype t;
  if (napi_typeof(env, argv[0], &t) != napi_ok || t != napi_string || (r->file = string_arg(env, argv[0])) == NULL ||
      r->file[0] != '/') {
    free(r->file);
    free(r);
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "expected an absolute program path");
    return NULL;
  }
  if ((r->argv = strings_arg(env, argv[1])) == NULL || (r->envp = strings_arg(env, argv[2])) == NULL) {
    free(r->file);
    free_strings(r->argv);
    free(r);
    return NULL;
  }
  napi_value promise, name;
  napi_create_promise(env, &r->deferred, &promise);
  napi_create_string_utf8(env, "reaper.spawnAt", NAPI_AUTO_LENGTH, &name);
  if (napi_create_async_work(env, NULL, name, spawn_execute, spawn_complete, r, &r->work) != napi_ok ||
      napi_queue_async_work(env, r->work) != napi_ok) {
    r->err = EAGAIN;
    r->failed = "napi_queue_async_work";
    spawn_complete(env, napi_ok, r);
  }
  return promise;
}

static napi_value wait_exited_js(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  int32_t pid;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (!int_arg(env, argv, argc, 0, &pid)) return NULL;
  if (pid <= 0) return throw_errno(env, EINVAL, "waitpid");
  int status = 0;
  pid_t rc;
  do rc = waitpid(pid, &status, WNOHANG); while (rc < 0 && errno == EINTR);
  if (rc < 0) return throw_errno(env, errno, "waitpid");
  napi_value result;
  if (rc == 0) {
    napi_get_null(env, &result);
    return result;
  }
  napi_create_object(env, &result);
  set_int(env, result, "code", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
  set_int(env, result, "signal", WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  return result;
}

/*
 * acceptPending(listenFd, max): the connections waiting in a listening socket's backlog, up
 * to max, as non-blocking close-on-exec fds (accept4 until EAGAIN). libuv (1.45+) accepts one
 * connection per turn of the event loop; a loop whose turns are long (a reap storm) would
 * let new connections wait in the backlog one turn each. Any error but EINTR and
 * ECONNABORTED ends the batch (EMFILE: libuv's own accept meets it next and handles it).
 */
static napi_value accept_pending_js(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  int32_t fd = -1, max = 0;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 2 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_value_int32(env, argv[1], &max) != napi_ok || fd < 0 || max < 0 || max > 4096) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "expected a listening fd and a count (0-4096)");
    return NULL;
  }
  napi_value result;
  napi_create_array(env, &result);
  uint32_t n = 0;
  while ((int32_t)n < max) {
    int c = accept4(fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (c < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      break;
    }
    napi_value v;
    napi_create_int32(env, c, &v);
    napi_set_element(env, result, n++, v);
  }
  return result;
}

static napi_value memfd_create_js(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  char name[64];
  size_t len = 0;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 1 || napi_get_value_string_utf8(env, argv[0], name, sizeof name, &len) != napi_ok) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "expected a name");
    return NULL;
  }
  int fd = memfd_create(name, MFD_CLOEXEC);
  if (fd < 0) return throw_errno(env, errno, "memfd_create");
  napi_value result;
  napi_create_int32(env, fd, &result);
  return result;
}

/*
 * ---- process events: the kernel's process events connector (netlink CN_IDX_PROC) ----
 *
 * The kernel reports every fork and exit on the host as it happens. A thread of our own
 * blocks on the socket (so a busy event loop never lets the kernel's buffer overrun), reads
 * each new process's start time from /proc/<pid>/stat at once (the identity that ties a pid
 * to one process), and appends compact records to a buffer; the event loop is woken once per
 * batch (uv_async_send coalesces) and drains it. procEventsDrain(true) also reads whatever the
 * kernel has queued up to this moment, on the calling thread: a barrier ("every fork before
 * now is known") for the decisions that need one.
 *
 * Record: 5 doubles [kind, pid, parent, startTime, cpuTicks]
 *   kind 1 fork: pid = the new process (thread-group id; new threads are skipped), parent = the
 *                forking process, startTime = its /proc start time (-1 if it was gone already,
 *                or the pid was reused before the read: checked against the event's time and
 *                the parent, pe_is_forked_child)
 *   kind 2 exit: pid = the process (its thread-group leader), parent = its parent at exit
 *                (-1 unknown), startTime as read then (-1 unknown, or a process born after
 *                the exit under its pid), cpuTicks = utime + stime + cutime + cstime as read at
 *                the exit (-1 unknown)
 * Lost events are counted, never silent: `overruns` (the socket's buffer overran: ENOBUFS)
 * and `dropped` (our buffer was full: PE_MAX_RECORDS, 10 MB).
 */
#include <linux/netlink.h>
#include <linux/connector.h>
#include <linux/cn_proc.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/utsname.h>
#include <time.h>

#define PE_FIELDS 5
#define PE_MAX_RECORDS (1 << 18)
#define PE_KIND_FORK 1
#define PE_KIND_EXIT 2

typedef struct {
  int fd;
  int stop_fd;
  pthread_t thread;
  pthread_mutex_t mu;
  double *recs; /* PE_FIELDS doubles per record */
  size_t len;   /* records */
  size_t cap;
  double overruns;
  double dropped;
  double events;
  long tick_ns;
  uv_async_t async;
  napi_env env;
  napi_ref callback;
  napi_async_context context;
} proc_events;

static proc_events *pe = NULL;

/* /proc/<pid>/stat: state, ppid, utime+stime+cutime+cstime, starttime; 0 if unreadable. */
static int pe_read_stat(int pid, char *state, long long *ppid, double *cpu, double *start) {
  char path[40];
  snprintf(path, sizeof path, "/proc/%d/stat", pid);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  char buf[1024];
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) return 0;
  buf[n] = '\0';
  char *p = strrchr(buf, ')'); /* comm may hold spaces and parentheses */
  if (p == NULL || p[1] != ' ' || p[2] == '\0') return 0;
  *state = p[2];
  char *s = p + 3; /* after the state */
  long long f[23];
  for (int i = 4; i <= 22; i++) {
    char *end;
    f[i] = strtoll(s, &end, 10);
    if (end == s) return 0;
    s = end;
  }
  *ppid = f[4];
  *cpu = (double)(f[14] + f[15] + f[16] + f[17]);
  *start = (double)f[22];
  return 1;
}

/* CLOCK_BOOTTIME - CLOCK_MONOTONIC: the event's timestamp (monotonic) to /proc's start time (boot time). */
static long long pe_boot_offset_ns(void) {
  struct timespec b, m;
  clock_gettime(CLOCK_BOOTTIME, &b);
  clock_gettime(CLOCK_MONOTONIC, &m);
  return ((long long)b.tv_sec - m.tv_sec) * 1000000000LL + ((long long)b.tv_nsec - m.tv_nsec);
}

static void pe_push(double kind, double pid, double parent, double start, double cpu) {
  if (pe->len == pe->cap) {
    if (pe->cap >= PE_MAX_RECORDS) {
      pe->dropped++;
      return;
    }
    size_t cap = pe->cap == 0 ? 1024 : pe->cap * 2;
    double *next = realloc(pe->recs, cap * PE_FIELDS * sizeof(double));
    if (next == NULL) {
      pe->dropped++;
      return;
    }
    pe->recs = next;
    pe->cap = cap;
  }
  double *r = pe->recs + pe->len * PE_FIELDS;
  r[0] = kind;
  r[1] = pid;
  r[2] = parent;
  r[3] = start;
  r[4] = cpu;
  pe->len++;
  pe->events++;
}

/*
 * Is the process now under the forked child's pid the child the event names? Its start time
 * (clock ticks since boot, rounded down) is at or before the event's moment, which the kernel
 * took after the child was made: a process born later under a recycled pid starts after it
 * (the boot-time offset read now is never smaller than at the event, so `at` is never early).
 * Within the same tick, the parent tells them apart: a child leaves its parent only when that
 * parent exits, so a child whose parent still lives under it must be its child still.
 */
static int pe_is_forked_child(const struct fork_proc_event *f, long long at, long long ppid, double start) {
  long long tick_per_s = 1000000000LL / pe->tick_ns;
  if ((long long)start > at) return 0;
  if ((long long)start < at - tick_per_s) return 0; /* a read long after (a suspend between): unknown */
  if (ppid == f->parent_tgid) return 1;
  char pstate;
  long long pppid;
  double pcpu, pstart;
  if (!pe_read_stat(f->parent_tgid, &pstate, &pppid, &pcpu, &pstart)) return 1; /* the parent is gone */
  if (pstate == 'Z' || pstate == 'X' || (long long)pstart > at) return 1;   /* it exited (or its pid was reused) */
  return 0; /* the parent lives on, and the process under the child's pid is not its child */
}

static void pe_event(const struct proc_event *ev) {
  long long ppid;
  double cpu, start;
  char state;
  if (ev->what == PROC_EVENT_FORK) {
    const struct fork_proc_event *f = &ev->event_data.fork;
    if (f->child_pid != f->child_tgid) return; /* a new thread, not a process */
    if (pe_read_stat(f->child_tgid, &state, &ppid, &cpu, &start)) {
      /* A read after the child exited may find another process under a recycled pid. */
      long long at = ((long long)ev->timestamp_ns + pe_boot_offset_ns()) / pe->tick_ns;
      if (!pe_is_forked_child(f, at, ppid, start)) start = -1;
    } else {
      start = -1;
    }
    pe_push(PE_KIND_FORK, f->child_tgid, f->parent_tgid, start, -1);
  } else if (ev->what == PROC_EVENT_EXIT) {
    const struct exit_proc_event *x = &ev->event_data.exit;
    if (x->process_pid != x->process_tgid) return; /* a thread */
    if (pe_read_stat(x->process_tgid, &state, &ppid, &cpu, &start)) {
      /* A process born after the exit under the same pid is not the one that exited. */
      long long at = ((long long)ev->timestamp_ns + pe_boot_offset_ns()) / pe->tick_ns;
      if ((long long)start > at) pe_push(PE_KIND_EXIT, x->process_tgid, -1, -1, -1);
      else pe_push(PE_KIND_EXIT, x->process_tgid, (double)ppid, start, cpu);
    } else {
      pe_push(PE_KIND_EXIT, x->process_tgid, -1, -1, -1);
    }
  }
}

/* Reads every queued datagram (non-blocking), under pe->mu; returns how many events it added. */
static size_t pe_pump(void) {
  char buf[8192] __attribute__((aligned(NLMSG_ALIGNTO)));
  size_t before = pe->len;
  for (;;) {
    ssize_t n = recv(pe->fd, buf, sizeof buf, MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == ENOBUFS) {
        pe->overruns++;
        continue;
      }
      break; /* EAGAIN: nothing more queued */
    }
    if (n == 0) break;
    int len = (int)n;
    for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, len); h = NLMSG_NEXT(h, len)) {
      if (h->nlmsg_type == NLMSG_ERROR || h->nlmsg_type == NLMSG_NOOP) continue;
      const struct cn_msg *cn = (const struct cn_msg *)NLMSG_DATA(h);
      if (cn->id.idx != CN_IDX_PROC || cn->id.val != CN_VAL_PROC) continue;
      pe_event((const struct proc_event *)cn->data);
    }
  }
  return pe->len - before;
}

static long long pe_now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/*
 * Reads as events come; wakes the event loop at most every PE_WAKE_MS (a fork storm would
 * otherwise wake it for nearly every datagram: an epoll round and a JS call each). Records
 * wait in the buffer meanwhile; procEventsDrain(true) takes them at once (the barrier does not
 * wait for a wake).
 */
#define PE_WAKE_MS 10
static void *pe_main(void *arg) {
  (void)arg;
  struct pollfd fds[2] = {{pe->fd, POLLIN, 0}, {pe->stop_fd, POLLIN, 0}};
  long long last_wake = 0;
  int pending = 0;
  for (;;) {
    int timeout = -1;
    if (pending) {
      long long left = last_wake + PE_WAKE_MS - pe_now_ms();
      timeout = left > 0 ? (int)left : 0;
    }
    int rc = poll(fds, 2, timeout);
    if (rc < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (fds[1].revents != 0) break;
    if (rc > 0 && fds[0].revents != 0) {
      pthread_mutex_lock(&pe->mu);
      double before = pe->overruns + pe->dropped;
      size_t added = pe_pump();
      int lost = pe->overruns + pe->dropped != before;
      pthread_mutex_unlock(&pe->mu);
      if (added > 0 || lost) pending = 1;
    }
    if (pending && pe_now_ms() - last_wake >= PE_WAKE_MS) {
      uv_async_send(&pe->async);
      last_wake = pe_now_ms();
      pending = 0;
    }
  }
  return NULL;
}

static void pe_on_async(uv_async_t *handle) {
  (void)handle;
  if (pe == NULL || pe->callback == NULL) return;
  napi_env env = pe->env;
  napi_handle_scope scope;
  napi_open_handle_scope(env, &scope);
  napi_value callback, recv, ignored;
  napi_get_reference_value(env, pe->callback, &callback);
  napi_get_global(env, &recv);
  napi_make_callback(env, pe->context, recv, callback, 0, NULL, &ignored);
  napi_close_handle_scope(env, scope);
}

static void pe_on_closed(uv_handle_t *handle) {
  free(handle->data);
}

/* Stops the thread and frees everything; safe to call twice. */
static void pe_stop(void) {
  if (pe == NULL) return;
  proc_events *p = pe;
  uint64_t one = 1;
  ssize_t w = write(p->stop_fd, &one, sizeof one);
  (void)w;
  pthread_join(p->thread, NULL);
  close(p->fd);
  close(p->stop_fd);
  pthread_mutex_destroy(&p->mu);
  free(p->recs);
  if (p->callback != NULL) napi_delete_reference(p->env, p->callback);
  if (p->context != NULL) napi_async_destroy(p->env, p->context);
  pe = NULL;
  p->async.data = p;
  uv_close((uv_handle_t *)&p->async, pe_on_closed);
}

static void pe_cleanup_hook(void *arg) {
  (void)arg;
  pe_stop();
}

/* Subscribes (PROC_CN_MCAST_LISTEN) and waits up to 1 s for the kernel's acknowledgement: a
 * process outside the initial pid or user namespace is silently ignored, and would wait forever. */
/*
 * Since Linux 6.6 a listener may name the events it wants (struct proc_input: the operation,
 * then a mask of event kinds): fork and exit only, so that the kernel does not queue, and the
 * thread does not read, an exec, a uid or a comm change for every process of a storm. Older
 * kernels ignore a message of that size (no acknowledgement): they get the plain one.
 */
static int pe_kernel_filters(void) {
  struct utsname u;
  int major = 0, minor = 0;
  if (uname(&u) != 0 || sscanf(u.release, "%d.%d", &major, &minor) != 2) return 0;
  return major > 6 || (major == 6 && minor >= 6);
}

#define PE_EVENT_FORK 0x00000001u /* PROC_EVENT_FORK */
#define PE_EVENT_EXIT 0x80000000u /* PROC_EVENT_EXIT */

static int pe_wait_ack(int fd, unsigned seq);

/* Sends PROC_CN_MCAST_LISTEN with seq/ack = seq; with `filtered`, the 6.6+ form naming fork and exit. */
static int pe_send_listen(int fd, unsigned seq, int filtered) {
  struct __attribute__((aligned(NLMSG_ALIGNTO))) {
    struct nlmsghdr nl;
    struct __attribute__((__packed__)) {
      struct cn_msg cn;
      uint32_t op;         /* enum proc_cn_mcast_op */
      uint32_t event_type; /* struct proc_input's mask (6.6+); not sent to older kernels */
    } body;
  } req;
  memset(&req, 0, sizeof req);
  size_t payload = filtered ? 2 * sizeof(uint32_t) : sizeof(uint32_t);
  req.nl.nlmsg_len = NLMSG_LENGTH(sizeof(struct cn_msg) + payload);
  req.nl.nlmsg_type = NLMSG_DONE;
  req.body.cn.id.idx = CN_IDX_PROC;
  req.body.cn.id.val = CN_VAL_PROC;
  req.body.cn.seq = seq;
  req.body.cn.ack = seq; /* answered as ack + 1 (the kernel numbers seq itself) */
  req.body.cn.len = (uint16_t)payload;
  req.body.op = PROC_CN_MCAST_LISTEN;
  req.body.event_type = PE_EVENT_FORK | PE_EVENT_EXIT;
  return send(fd, &req, req.nl.nlmsg_len, 0) < 0 ? errno : 0;
}

/*
 * Subscribes and waits up to 1 s for the kernel's acknowledgement (a process outside the
 * initial pid or user namespace is silently ignored, and would wait forever); then, where the
 * kernel filters (6.6+), narrows the subscription to fork and exit. The acknowledgement of
 * that second message is itself filtered out by the kernel (it is no fork and no exit): it is
 * not waited for, and the first one proved the kernel hears us.
 */
static int pe_subscribe(int fd) {
  unsigned seq = (unsigned)getpid() ^ (unsigned)time(NULL);
  int err = pe_send_listen(fd, seq, 0);
  if (err != 0) return err;
  err = pe_wait_ack(fd, seq);
  if (err == 0 && pe_kernel_filters()) (void)pe_send_listen(fd, seq + 2, 1);
  return err;
}

static int pe_wait_ack(int fd, unsigned seq) {
  struct timespec t0;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  char buf[8192] __attribute__((aligned(NLMSG_ALIGNTO)));
  for (;;) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    long elapsed = (t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000;
    if (elapsed >= 1000) return ETIMEDOUT;
    struct pollfd pfd = {fd, POLLIN, 0};
    if (poll(&pfd, 1, (int)(1000 - elapsed)) <= 0) continue;
    ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
    if (n <= 0) continue;
    int len = (int)n;
    for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, len); h = NLMSG_NEXT(h, len)) {
      const struct cn_msg *cn = (const struct cn_msg *)NLMSG_DATA(h);
      if (cn->id.idx != CN_IDX_PROC || cn->id.val != CN_VAL_PROC) continue;
      const struct proc_event *ev = (const struct proc_event *)cn->data;
      if (ev->what == PROC_EVENT_NONE && cn->ack == seq + 1) return (int)ev->event_data.ack.err;
    }
  }
}

static napi_value proc_events_open_js(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_valuetype t;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 1 || napi_typeof(env, argv[0], &t) != napi_ok || t != napi_function) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "expected a callback");
    return NULL;
  }
  if (pe != NULL) return throw_errno(env, EBUSY, "procEventsOpen");
  uv_loop_t *loop;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok) {
    napi_throw_error(env, "EUNKNOWN", "no event loop");
    return NULL;
  }
  int fd = socket(PF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_CONNECTOR);
  if (fd < 0) return throw_errno(env, errno, "socket(NETLINK_CONNECTOR)");
  /* A fork storm fills the default 208 KB in a few ms of a stall: ask for 8 MB (root may exceed rmem_max). */
  int size = 8 << 20;
  if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) != 0)
    (void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
  struct sockaddr_nl sa;
  memset(&sa, 0, sizeof sa);
  sa.nl_family = AF_NETLINK;
  sa.nl_groups = CN_IDX_PROC;
  sa.nl_pid = 0;
  if (bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
    int err = errno;
    close(fd);
    return throw_errno(env, err, "bind(CN_IDX_PROC)");
  }
  int err = pe_subscribe(fd);
  if (err != 0) {
    close(fd);
    return throw_errno(env, err, "PROC_CN_MCAST_LISTEN");
  }
  proc_events *p = calloc(1, sizeof *p);
  if (p == NULL) {
    close(fd);
    return throw_errno(env, ENOMEM, "procEventsOpen");
  }
  p->fd = fd;
  p->stop_fd = eventfd(0, EFD_CLOEXEC);
  p->tick_ns = 1000000000L / sysconf(_SC_CLK_TCK);
  p->env = env;
  if (p->stop_fd < 0) {
    err = errno;
    close(fd);
    free(p);
    return throw_errno(env, err, "eventfd");
  }
  pthread_mutex_init(&p->mu, NULL);
  int rc = uv_async_init(loop, &p->async, pe_on_async);
  if (rc != 0) {
    close(fd);
    close(p->stop_fd);
    free(p);
    napi_throw_error(env, uv_err_name(rc), uv_strerror(rc));
    return NULL;
  }
  /* The events must not keep the daemon's event loop alive on their own. */
  uv_unref((uv_handle_t *)&p->async);
  napi_value name;
  napi_create_string_utf8(env, "reaper.procEvents", NAPI_AUTO_LENGTH, &name);
  napi_async_init(env, NULL, name, &p->context);
  napi_create_reference(env, argv[0], 1, &p->callback);
  pe = p;
  rc = pthread_create(&p->thread, NULL, pe_main, NULL);
  if (rc != 0) {
    pe = NULL;
    napi_delete_reference(env, p->callback);
    napi_async_destroy(env, p->context);
    close(fd);
    close(p->stop_fd);
    p->async.data = p;
    uv_close((uv_handle_t *)&p->async, pe_on_closed);
    return throw_errno(env, rc, "pthread_create");
  }
  napi_add_env_cleanup_hook(env, pe_cleanup_hook, NULL);
  return NULL;
}

static napi_value proc_events_drain_js(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  bool flush = false;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc >= 1) napi_get_value_bool(env, argv[0], &flush);
  napi_value result, array, buffer;
  napi_create_object(env, &result);
  if (pe == NULL) return throw_errno(env, EBADF, "procEventsDrain");
  pthread_mutex_lock(&pe->mu);
  if (flush) pe_pump();
  void *data = NULL;
  size_t bytes = pe->len * PE_FIELDS * sizeof(double);
  if (napi_create_arraybuffer(env, bytes, &data, &buffer) == napi_ok) {
    if (bytes > 0) memcpy(data, pe->recs, bytes);
    pe->len = 0;
    if (pe->cap > 65536) { /* give back a storm's buffer */
      free(pe->recs);
      pe->recs = NULL;
      pe->cap = 0;
    }
  }
  double overruns = pe->overruns, dropped = pe->dropped, events = pe->events;
  pthread_mutex_unlock(&pe->mu);
  napi_create_typedarray(env, napi_float64_array, bytes / sizeof(double), buffer, 0, &array);
  napi_set_named_property(env, result, "records", array);
  napi_value v;
  napi_create_double(env, overruns, &v);
  napi_set_named_property(env, result, "overruns", v);
  napi_create_double(env, dropped, &v);
  napi_set_named_property(env, result, "dropped", v);
  napi_create_double(env, events, &v);
  napi_set_named_property(env, result, "events", v);
  return result;
}

static napi_value proc_events_close_js(napi_env env, napi_callback_info info) {
  (void)info;
  if (pe != NULL) {
    napi_remove_env_cleanup_hook(env, pe_cleanup_hook, NULL);
    pe_stop();
  }
  return NULL;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"pidfdOpen", NULL, pidfd_open_js, NULL, NULL, NULL, napi_default, NULL},
      {"pidfdSendSignal", NULL, pidfd_send_signal_js, NULL, NULL, NULL, napi_default, NULL},
      {"closeFd", NULL, close_fd_js, NULL, NULL, NULL, napi_default, NULL},
      {"watchExit", NULL, watch_exit_js, NULL, NULL, NULL, napi_default, NULL},
      {"unwatch", NULL, unwatch_js, NULL, NULL, NULL, napi_default, NULL},
      {"openDirAt", NULL, open_dir_at_js, NULL, NULL, NULL, napi_default, NULL},
      {"sendDatagram", NULL, send_datagram_js, NULL, NULL, NULL, napi_default, NULL},
      {"peerCred", NULL, peer_cred_js, NULL, NULL, NULL, napi_default, NULL},
      {"flockExclusive", NULL, flock_exclusive_js, NULL, NULL, NULL, napi_default, NULL},
      {"spawnAt", NULL, spawn_at_js, NULL, NULL, NULL, napi_default, NULL},
      {"waitExited", NULL, wait_exited_js, NULL, NULL, NULL, napi_default, NULL},
      {"memfdCreate", NULL, memfd_create_js, NULL, NULL, NULL, napi_default, NULL},
      {"acceptPending", NULL, accept_pending_js, NULL, NULL, NULL, napi_default, NULL},
      {"procEventsOpen", NULL, proc_events_open_js, NULL, NULL, NULL, napi_default, NULL},
      {"procEventsDrain", NULL, proc_events_drain_js, NULL, NULL, NULL, napi_default, NULL},
      {"procEventsClose", NULL, proc_events_close_js, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
