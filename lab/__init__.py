"""The lab: launchers for the real peers (vcsim) and governord's own simulators of peers that
cannot run here (Foreman, Satellite). Used by the tests and by ``make demo``; never installed."""
