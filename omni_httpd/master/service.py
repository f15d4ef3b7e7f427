"""The master service: start-up and shutdown, in order, in one place.

Start: (embedded PostgreSQL) -> schema migrations -> default listener (unless --no-init)
-> LISTEN for configuration changes -> bind listeners -> spawn workers -> first
configuration applied and recorded -> admin console.
Stop (SIGTERM/SIGINT): admin console off -> workers stop accepting, finish in-flight
requests within the grace period and exit -> sockets closed -> database connection
closed -> embedded PostgreSQL stopped.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Optional

import psycopg2
from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger

from omni_httpd.master import migrations
from omni_httpd.master import privileges
from omni_httpd.master import queries
from omni_httpd.master.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError
from omni_httpd.master.fleet import Fleet
from omni_httpd.master.reload import Reloader
from omni_httpd.common.scoreboard import Scoreboard
from omni_httpd.common.settings import Settings

log = Logger()


class _Interrupted(Exception):
    """A shutdown was requested while starting."""


class StartupError(Exception):
    """Fatal start-up problem; str() is the one line the operator sees."""


def one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else exc.__class__.__name__


class MasterService(service.MultiService):
    def __init__(self, settings: Settings, reactor=None):
        super().__init__()
        self.settings = settings
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.reactor = reactor
        self.embedded: Optional[EmbeddedPostgres] = None
        self.dsn = settings.dsn
        self.db = None
        self.fleet: Optional[Fleet] = None
        self.reloader: Optional[Reloader] = None
        self.scoreboard: Optional[Scoreboard] = None
        self.run_dir: Optional[str] = None
        self.worker_account: Optional[privileges.Account] = None
        self.admin_port = None
        self.metrics = None           # master/metrics.py's MasterMetrics, with --metrics
        self.metrics_port = None
        self.ready = defer.Deferred()
        self._failed = False
        self._stopping = False
        self._starting: Optional[defer.Deferred] = None

    # -- start ------------------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        d = defer.ensureDeferred(self._start())
        d.addErrback(self._fatal)
        self._starting = d

    def _step_done(self) -> None:
        """Between start-up steps: a shutdown requested meanwhile ends the start-up."""
        if self._stopping:
            raise _Interrupted()

    def setServiceParent(self, parent) -> None:
        super().setServiceParent(parent)
        if self.settings.log_format == "json" and hasattr(parent, "setComponent"):
            # twistd's logging starts after this and takes the application's observer
            # over its own text one (twisted.application.app.AppLogger.start).
            from twisted.logger import ILogObserver

            from omni_httpd.common.logformat import json_observer
            parent.setComponent(ILogObserver, json_observer(sys.stdout))

    async def _start(self) -> None:
        settings = self.settings
        # First, so that /live answers (and /ready says "starting") during start-up.
        await self._start_metrics()
        self._step_done()
        if self.dsn is None:
            self.embedded = EmbeddedPostgres(settings.data_dir)
            try:
                created = await threads.deferToThread(self.embedded.start)
            except EmbeddedPostgresError as exc:
                raise StartupError(str(exc))
            self.dsn = self.embedded.dsn
            self._step_done()
            log.info("embedded PostgreSQL {state} in {dir}; connect with: psql \"{dsn}\"",
                     state="created" if created else "reused", dir=self.embedded.pgdata, dsn=self.dsn)
        self.worker_account = self._choose_worker_account()
        try:
            applied = await threads.deferToThread(migrations.apply, self.dsn)
        except psycopg2.OperationalError as exc:
            raise StartupError("cannot connect to the database: %s" % one_line(exc))
        self._step_done()
        if applied:
            log.info("schema migrations applied: {names}", names=", ".join(applied))
        if settings.init:
            await threads.deferToThread(self._initialize_default)
            self._step_done()

        self.db = await self._connect()
        self._step_done()
        self.run_dir = tempfile.mkdtemp(prefix="omni_httpd_")   # 0700
        self.scoreboard = Scoreboard(os.path.join(self.run_dir, "scoreboard"), settings.http_workers, create=True)
        privileges.hand_over([self.run_dir, self.scoreboard.path], self.worker_account)
        self.reloader = Reloader(settings, self.db, settings.http_workers)
        if self.metrics is not None:
            self.reloader.on_applied = self.metrics.reload_applied
        # LISTEN before the first read, so no change can fall between the two; changes
        # notified during start-up make one more reload once the first is applied.
        self.db.addNotifyObserver(self._notified)
        await self.db.runOperation(queries.LISTEN)
        self._step_done()
        await self.reloader.load()
        self._step_done()
        self.fleet = Fleet(self.reactor, settings, self.dsn, self.run_dir, self.scoreboard,
                           self.reloader.listener_fds, self.reloader.config_message,
                           account=self.worker_account)
        self.reloader.fleet = self.fleet
        self.fleet.start()
        await self.reloader.apply()
        self._step_done()
        self.reloader.started()
        await self._start_admin()
        self._step_done()
        log.info("omni_httpd ready: {workers} HTTP worker(s); {summary}",
                 workers=settings.http_workers, summary=self.reloader.summary())
        self.ready.callback(None)

    def _choose_worker_account(self) -> Optional[privileges.Account]:
        """As root: the account the workers run as (privileges.py), checked now, once."""
        settings = self.settings
        needed = privileges.worker_requirements(self.dsn, tempfile.gettempdir(),
                                                (settings.tls_cert, settings.tls_key))
        cluster_account = self.embedded.account if self.embedded is not None else None
        try:
            account, warning = privileges.choose_worker_account(settings.worker_user, cluster_account, needed)
        except privileges.WorkerAccountError as exc:
            raise StartupError(str(exc))
        if warning:
            log.warn("{warning}", warning=warning)
        if account is not None:
            log.info("HTTP workers run as account {name!r} (uid {uid}, gid {gid})",
                     name=account.name, uid=account.uid, gid=account.gid)
            for name, directory in sorted(settings.static_roots.items()):
                # Not a reason to keep the workers root: the operator is told instead.
                blocked = privileges.inaccessible(account, [(directory, privileges.R | privileges.X)])
                if blocked is not None:
                    log.warn("--static-root {name}={directory}: account {account!r} cannot read "
                             "it ({path} is in the way); its files will not be served",
                             name=name, directory=directory, account=account.name, path=blocked[1])
        return account

    def _initialize_default(self) -> None:
        connection = psycopg2.connect(self.dsn)
        try:
            migrations.initialize_default(connection, self.settings.init_listen_address, self.settings.init_port)
        finally:
            connection.close()

    async def _connect(self):
        from txpostgres import reconnection, txpostgres

        class Connection(txpostgres.Connection):
            """txpostgres, minus the traceback when the idle LISTEN connection dies.

            psycopg2 raises from the reactor's read callback then; returning the error
            instead makes Twisted close it the same way (and the detector reconnect),
            with one log line for the operator instead of an "Unhandled Error".
            """

            def doRead(self):
                try:
                    return super().doRead()
                except psycopg2.Error as exc:
                    log.warn("the database connection for configuration changes was lost "
                             "({error}); reconnecting", error=one_line(exc))
                    # The error itself, so the detector recognises a dead connection.
                    return exc

        detector = reconnection.DeadConnectionDetector(
            # Retry soon after an outage: 0.5 s, then at most every 2 s (txpostgres'
            # default grows to 10 s, so changes could wait that long after the database
            # came back).
            reconnectionIterator=lambda: iter([0.5, 1.0] + [2.0] * 1000000))
        connection = Connection(reactor=self.reactor, detector=detector)
        try:
            await connection.connect(self.dsn)
        except psycopg2.Error as exc:
            raise StartupError("cannot connect to the database: %s" % one_line(exc))
        detector.addRecoveryHandler(self._database_recovered)
        return connection

    def _database_recovered(self):
        log.info("database connection recovered; listening again and reloading")
        if self.metrics is not None:
            self.metrics.master_reconnects.inc()
        d = self.db.runOperation(queries.LISTEN)
        d.addCallback(lambda _: self.reloader.request())
        d.addErrback(lambda f: log.error("after reconnecting: {error}", error=one_line(f.value)))
        return d

    def _notified(self, notify) -> None:
        if notify.channel == queries.NOTIFY_CHANNEL and self.reloader is not None:
            self.reloader.request()

    async def _start_metrics(self) -> None:
        if not self.settings.metrics:
            return
        from twisted.internet import endpoints

        from omni_httpd.master import metrics

        self.metrics = metrics.MasterMetrics(self)
        endpoint = endpoints.serverFromString(self.reactor, self.settings.metrics)
        try:
            self.metrics_port = await endpoint.listen(metrics.site(self, self.metrics.registry))
        except Exception as exc:
            raise StartupError("metrics: cannot listen on %s: %s" % (self.settings.metrics, one_line(exc)))
        address = self.metrics_port.getHost()
        log.info("metrics and probes listening on http://{host}:{port}/ (/live, /ready, /metrics)",
                 host=getattr(address, "host", ""), port=getattr(address, "port", ""))

    async def _start_admin(self) -> None:
        if not self.settings.admin:
            return
        from twisted.internet import endpoints
        from twisted.web.server import Site

        from omni_httpd.console.app import AdminConsole

        try:
            console = AdminConsole(self.state, self.dsn, password=self.settings.admin_password,
                                   password_file=self.settings.admin_password_file, reactor=self.reactor,
                                   settings=self.settings)
        except ValueError as exc:
            raise StartupError("admin console: %s" % one_line(exc))
        endpoint = endpoints.serverFromString(self.reactor, self.settings.admin)
        site = Site(console.resource())
        site.log = lambda request: None  # the console's own requests are not HTTP traffic worth logging
        try:
            self.admin_port = await endpoint.listen(site)
        except Exception as exc:
            raise StartupError("admin console: cannot listen on %s: %s" % (self.settings.admin, one_line(exc)))
        address = self.admin_port.getHost()
        host = getattr(address, "host", "")
        log.info("admin console listening on http://{host}:{port}/", host=host, port=getattr(address, "port", ""))
        if console.generated_password_file:
            # The path, not the password: logs are often readable by many.
            log.warn("admin console password generated: it is in {path} (mode 0600, readable "
                     "only by this account); give --admin-password-file to choose one",
                     path=console.generated_password_file)

    @property
    def state(self):
        return MasterState(self)

    # -- failure and stop ---------------------------------------------------------------------
    def _fatal(self, failure) -> None:
        if failure.check(_Interrupted) or (self._stopping and failure.check(defer.CancelledError)):
            log.info("start-up interrupted by shutdown")
            return
        if failure.check(StartupError):
            message = str(failure.value)
        else:
            log.failure("start-up failed", failure)
            message = one_line(failure.value)
        log.critical("omni_httpd cannot start: {message}", message=message)
        # twistd routes sys.stderr into the log; the operator's terminal is the original.
        stream = sys.__stderr__ or sys.stderr
        stream.write("omni_httpd: error: %s\n" % message)
        stream.flush()
        self._failed = True
        if not self.ready.called:
            self.ready.errback(failure)
            self.ready.addErrback(lambda _: None)
        self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    def stopService(self):
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        log.info("shutting down")
        self._stopping = True
        if self._starting is not None and not self._starting.called and self.fleet is None:
            # Let the start-up step under way finish; it stops at the next step. (Once
            # the fleet exists, stopping it below cancels what start-up waits for.)
            await self._starting
        if self.admin_port is not None:
            await self.admin_port.stopListening()
        if self.fleet is not None:
            await self.fleet.stop(self.settings.shutdown_grace)
        if self.reloader is not None:
            self.reloader.close()
        if self.db is not None:
            try:
                self.db.close()
            except Exception:
                pass
        if self.scoreboard is not None:
            board, self.scoreboard = self.scoreboard, None   # a scrape now reads no closed map
            board.close()
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.embedded is not None:
            await threads.deferToThread(self.embedded.stop)
            log.info("embedded PostgreSQL stopped")
        if self.metrics_port is not None:
            await self.metrics_port.stopListening()
        if not self._failed:
            # twistd re-raises the signal that stopped the reactor (the process would end
            # "killed by SIGTERM"); an orderly shutdown is a success: exit status 0.
            self.reactor._exitSignal = None
        log.info("stopped")


class MasterState:
    """What the admin console reads: live, cheap, no database round trip."""

    def __init__(self, master: MasterService):
        self._master = master

    def workers(self):
        if self._master.scoreboard is None:
            return []
        return self._master.scoreboard.snapshot()

    def listeners(self):
        if self._master.reloader is None:
            return []
        return self._master.reloader.listener_states()

    def last_reload(self):
        if self._master.reloader is None:
            return None
        return self._master.reloader.last_reload

    def request_reload(self) -> None:
        if self._master.reloader is not None:
            self._master.reloader.request()
