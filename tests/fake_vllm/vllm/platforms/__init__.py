"""The fake vLLM's platform: a CPU build (vllm.platforms.current_platform.device_type), as vLLM reports one."""


class _Platform:
    device_type = "cpu"


current_platform = _Platform()
