"""``kubectl-dbf`` (``kubectl dbf``), the kubectl plugin: an entry point, like :mod:`dbtbackfill.cli`.

- :mod:`~dbtbackfill.kubectl.plugin`: the commands (status, retry, suspend, resume, logs, history);
- :mod:`~dbtbackfill.kubectl.calendar_view`: the pure calendar heat map behind ``status``.

May import the operator, the runner and the core (and :mod:`dbtbackfill.cli` for ``history``);
nothing imports this package.
"""
