"""Command-line option types shared by the root scripts (a script never imports another script)."""
