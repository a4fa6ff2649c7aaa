"""The two model roles behind small protocols: ``Planner`` (MLLM) and ``ImageTool`` (DiT)."""
