"""The built-in verification sample: 8 queries x 8 passages, used where DL19 is absent.

Written for edgerank by its authors and released with the code under Apache-2.0 (no text
is copied from elsewhere). Each query has three passages that answer it, two on its topic
that do not, and three from other topics, so a reranker's scores spread from clearly
relevant to clearly irrelevant and a rank correlation over them is stable: a conversion
check read off near-tied scores passes or fails by chance (issue 26).
"""

from __future__ import annotations

SAMPLE: list[tuple[str, list[str]]] = [
    ("how do vaccines train the immune system", [
        "Vaccines expose the immune system to a harmless piece or a weakened form of a pathogen, "
        "so that it learns to recognise the real infection later.",
        "After vaccination, B cells make antibodies against the antigen and some of them remain "
        "as memory cells that respond quickly if the pathogen ever returns.",
        "A booster dose reminds the immune system of an antigen it has already seen, raising the "
        "level of antibodies that protect against the disease.",
        "Edward Jenner published his work on cowpox in 1798, and the word vaccine comes from the "
        "Latin for cow.",
        "Some vaccines must be kept refrigerated between two and eight degrees Celsius during "
        "transport and storage.",
        "The stock market closed higher on Friday after strong quarterly earnings reports from "
        "several technology companies.",
        "To keep a sourdough starter alive, feed it flour and water every day and keep it at room "
        "temperature.",
        "The printing press spread across Europe in the fifteenth century after Gutenberg's "
        "movable type.",
    ]),
    ("what is the capital of france", [
        "Paris is the capital and the most populous city of France.",
        "The French government, the president and the national parliament all sit in Paris, the "
        "country's capital.",
        "Since the tenth century Paris has been the political centre and capital of the French "
        "state.",
        "France is famous for its cheeses, among them brie, camembert and roquefort.",
        "The Tour de France is a cycling race held every July across the French countryside.",
        "Berlin became the capital of reunified Germany in 1990.",
        "Photosynthesis converts light, water and carbon dioxide into sugar and oxygen.",
        "A binary search halves the search interval at every step of the loop.",
    ]),
    ("how does photosynthesis work in plants", [
        "In photosynthesis, chlorophyll in the chloroplasts absorbs light energy, which the plant "
        "uses to turn carbon dioxide and water into glucose, releasing oxygen.",
        "The light reactions of photosynthesis split water and make ATP and NADPH; the Calvin "
        "cycle then uses them to fix carbon dioxide into sugar.",
        "Leaves take in carbon dioxide through small pores called stomata, and the plant builds "
        "sugars from it using the energy of sunlight.",
        "Many houseplants prefer indirect light and should be watered only when the soil is dry.",
        "Autumn leaves turn red and yellow as trees stop producing green pigment before winter.",
        "The Eiffel Tower was completed in 1889 for the World's Fair in Paris.",
        "Interest rates rose for the third time this year as the central bank fought inflation.",
        "A goalkeeper may handle the ball only inside his own penalty area.",
    ]),
    ("symptoms of iron deficiency anaemia", [
        "Iron deficiency anaemia commonly causes tiredness, pale skin, shortness of breath and a "
        "fast heartbeat.",
        "People with low iron may feel weak and dizzy, get headaches, and have brittle nails or "
        "cold hands and feet.",
        "A lack of iron reduces haemoglobin, so less oxygen reaches the tissues, which shows as "
        "fatigue and breathlessness on exertion.",
        "Red meat, lentils and spinach are good dietary sources of iron.",
        "Iron is a chemical element with the symbol Fe and atomic number 26.",
        "The orchestra tuned to the oboe's A before the concert began.",
        "Glaciers carve U-shaped valleys as they move slowly downhill.",
        "The new phone has a larger battery and a faster processor than last year's model.",
    ]),
    ("how to reverse a linked list", [
        "To reverse a singly linked list, walk it once keeping three pointers, previous, current "
        "and next, and point each node's next field back at the previous node.",
        "A recursive reversal reverses the rest of the list first and then makes the following "
        "node point back to the current one, setting the current node's next to null.",
        "Reversing a linked list in place takes linear time and constant extra memory when done "
        "iteratively with pointer swaps.",
        "A linked list stores elements in nodes, each holding a value and a reference to the next "
        "node.",
        "Arrays allow constant-time access by index, while linked lists must be traversed from the "
        "head.",
        "The Amazon river carries more water than any other river on Earth.",
        "Bake the bread at 220 degrees for thirty minutes until the crust is golden.",
        "Migrating birds use the Earth's magnetic field to find their way.",
    ]),
    ("why is the sky blue", [
        "The sky looks blue because air molecules scatter short blue wavelengths of sunlight much "
        "more strongly than long red ones, a process called Rayleigh scattering.",
        "Sunlight contains all colours; as it passes through the atmosphere the blue part is "
        "scattered in every direction, so blue light reaches our eyes from all over the sky.",
        "Rayleigh scattering grows with the inverse fourth power of wavelength, which is why "
        "scattered skylight is dominated by blue.",
        "At sunset the sky turns red and orange because the light travels through more air.",
        "Blue is one of the three primary colours of light, with red and green.",
        "Tax returns must be filed by the end of April in many countries.",
        "A violin has four strings tuned in perfect fifths.",
        "The recipe calls for two eggs, a cup of sugar and a pinch of salt.",
    ]),
    ("benefits of regular exercise for the heart", [
        "Regular aerobic exercise strengthens the heart muscle, lowers resting heart rate and "
        "reduces blood pressure.",
        "People who exercise most days have a lower risk of heart disease and stroke, because "
        "activity improves cholesterol levels and blood vessel function.",
        "Thirty minutes of brisk walking five days a week improves cardiovascular fitness and "
        "helps the heart pump more blood with each beat.",
        "Running shoes should be replaced every five to eight hundred kilometres.",
        "The heart has four chambers: two atria and two ventricles.",
        "The museum's new wing displays sculpture from the Roman empire.",
        "Compilers translate source code into machine instructions.",
        "Volcanic eruptions can release ash high into the stratosphere.",
    ]),
    ("how do bees make honey", [
        "Bees collect nectar from flowers, carry it back to the hive, and pass it between workers "
        "who add enzymes that break its sugars down.",
        "Inside the hive, bees spread the nectar in wax cells and fan it with their wings until "
        "enough water evaporates and it becomes honey, then seal the cells with wax.",
        "Honey is nectar that worker bees have concentrated by evaporation and changed with "
        "enzymes such as invertase.",
        "A honey bee colony has one queen, thousands of female workers and a few hundred drones.",
        "Bee stings can cause severe allergic reactions in some people.",
        "The Great Wall of China stretches for thousands of kilometres.",
        "The train to the airport leaves every fifteen minutes from platform two.",
        "Quantum computers use qubits that can be in superpositions of states.",
    ]),
]
