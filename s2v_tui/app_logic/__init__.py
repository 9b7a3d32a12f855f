"""What the screens show, computed without Textual: run snapshots, run decisions, the runs list, preset rows,
config fields and number formats. Tested as plain functions."""
