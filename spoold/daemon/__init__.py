"""The daemon and its command: ``spoold run``, the admin CLI, the control
socket, the SMTP listener and sendmail ingest, routing, metrics, logging and
systemd integration.

Nothing here is library API: a program that embeds spoold uses what
:mod:`spoold` exports. These modules may change between releases without
notice; the daemon's public interfaces are its command line, its
configuration file, its control protocol and its JSON listing (see the
documentation in ``docs/``).
"""
