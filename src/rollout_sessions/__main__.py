"""``python -m rollout_sessions``: the same as the ``rollout-sessions`` command."""

import sys

from rollout_sessions.cli import main

sys.exit(main())
