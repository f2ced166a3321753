"""StoryWorld: a procedural story world (cast, grammar, renderer) that makes data and eval exact."""

from data_pipelines.storyworld.grammar import Story, generate_story
from data_pipelines.storyworld.renderer import render_story
