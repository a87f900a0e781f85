"""Reference tasks (model + data + loss + metrics) and grid specs for trickbench."""
