"""`canary demo`: a whole rollout on one machine, to show what the proxy does.

`command` holds the command line and the options, `run` the story (a real config in a
temp dir, the real proxy), `upstream` the simulated OpenAI-compatible legacy and async
services, `traffic` the generator and `report` the live progress and the summary.
Nothing outside this package imports it, except the CLI's parser.
"""
