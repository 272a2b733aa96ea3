"""governord plugins shipped with the daemon; each sub-package is loaded through the ``governord`` entry-point group."""
