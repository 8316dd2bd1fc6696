"""Engine: requests, scheduler, model runner, streaming Engine and offline LLM."""
