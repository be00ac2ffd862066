"""Small leaf helpers every layer uses: one-line errors (``errors``) and the CLI that prints them (``cli``), atomic
writes (``atomic``), run dirs (``rundir``), config checks (``config_checks``), the console (``console``), the run's
outcome record (``results``), drawing (``plots``) and the names that moved (``moved``). They import nothing above."""
