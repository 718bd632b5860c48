"""Multi-turn, tool-using rollouts: environments (environment.py), trajectories assembled token in,
token out (trajectory.py), the rollout loop that drives them on an engine (rollouts.py), and the
tool environment with its tools and sandbox (tool_env.py, tools.py, sandbox.py).

How it plugs in: with `rollout.environment` or `rollout.tools` set, rollout/collect.py hands a
step's prompts to `agents.rollouts.generate_trajectories` instead of one `engine.generate`; the
result is the same `Rollout` list, whose `response_ids` hold every token after the prompt and whose
`response_mask` marks the model's own (trainable) tokens. The actor computes log-probs over the
whole response and counts only the masked tokens in every loss, score and metric.
"""
