from selfie_lite.cli import main

# Guarded: the vLLM sampler's child process (vllm_process.py, spawn) imports this module again, and must not rerun the CLI.
if __name__ == "__main__":
    main()
