"""What the test modules share. A test module imports from here, never from another test module.

    certs      the one certificate factory (``Authority``), the suite's clock reading ``NOW``, the workload IDs
    polling    ``wait_until``: every wait in the suite polls a condition until a deadline, none sleeps blindly
    ca_cli     the ``ca`` command run the way an admin runs it (``run_ca``, ``issue``) and what it leaves on disk
    processes  ``LoggedProcess`` and its two kinds, ``Sidecar`` (``proxy run``) and ``CaService`` (``ca serve``);
               their configs, and the log lines that end a connection
    network    an echo app, TLS and plain clients, ports, network namespaces
    tools      where the external tools that the Makefile installs into .venv-tools are found
"""
