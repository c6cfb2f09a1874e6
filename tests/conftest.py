"""Settings for the whole suite."""

import os

# A bug of ours inside the core (an exception its own code did not expect) is raised, not
# only counted and logged, in every node the tests start (in-process and child processes).
os.environ.setdefault("S6_RAISE_BUGS", "1")
