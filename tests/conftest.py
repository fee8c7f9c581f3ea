"""Suite-wide setup."""

from __future__ import annotations

import signal

# A suite started as a background job of a non-interactive shell (`make test &`, some CI
# runners) inherits SIGINT ignored, and every command the tests start would inherit it too:
# the Ctrl-C tests would then see a launcher that cannot be interrupted (Python installs its
# KeyboardInterrupt handler only where SIGINT arrives with its default action). A process
# with a handler of its own passes the default action on to the programs it starts.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
