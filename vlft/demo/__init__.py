"""The main job out of the box: a generated picture-and-video task (task.py) and `vlft demo` (run.py)."""
