"""Fakes and drivers for the app's tests, the snapshots and `s2v-tui --fake`: fixed hardware readings, a fake
engine, a tmux driver for the real terminal."""
