"""StoryWorld evaluation: a deterministic keyframe detector, script semantics and metrics."""
