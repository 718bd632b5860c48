"""Environments plugged in by import path in the multi-turn tests (`rollout.environment:
multiturn_env:CountingEnv`), one plain and one `async def`."""


class CountingEnv:
    """The row's prompt as the first messages; every model turn is answered by a tool message
    ("result k") until `turns` turns have run or the model writes "ANSWER"; `reward` None leaves the
    label to the run's verifier."""

    def __init__(
        self, turns: int = 2, reward=None, role: str = "tool", message: str = "result {n}", tools: bool = True
    ):
        self.turns, self.reward, self.role, self.message, self.offer_tools = turns, reward, role, message, tools
        self.replies: list[str] = []
        self.closed = False
        self.stats = {"tool_calls": 0}

    def reset(self, example: dict) -> list[dict]:
        self.example = example
        return list(example["prompt"])

    def step(self, reply_text: str):
        self.replies.append(reply_text)
        if len(self.replies) >= self.turns or "ANSWER" in reply_text:
            return [], True, self.reward
        self.stats["tool_calls"] += 1
        return [{"role": self.role, "content": self.message.format(n=len(self.replies))}], False, None

    def tools(self) -> list[dict]:
        if not self.offer_tools:
            return []
        return [{"type": "function", "function": {"name": "count", "parameters": {"type": "object"}}}]

    def close(self) -> None:
        self.closed = True


class AsyncCountingEnv(CountingEnv):
    async def reset(self, example: dict) -> list[dict]:
        return super().reset(example)

    async def step(self, reply_text: str):
        return super().step(reply_text)
