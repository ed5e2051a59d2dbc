"""Test rigs: set-ups the system tests run on (cluster.py: a multi-host cluster on one Linux machine)."""
