"""Rows in the layouts GSM8K and MATH are released in, for the data-in and reward tests.

The first three GSM8K rows are the first rows of GSM8K's test file (calculator notes
``<<a*b=c>>`` and the final ``#### N`` line as released); the last two are written in the same
format to cover a thousands comma and a negative answer. The MATH rows have its columns
(problem, level, type, solution with ``\\boxed{}``)."""

GSM8K_ROWS = [
    {"question": "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins "
                 "for her friends every day with four. She sells the remainder at the farmers' market daily for $2 "
                 "per fresh duck egg. How much in dollars does she make every day at the farmers' market?",
     "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day "
               "at the farmer’s market.\n#### 18"},
    {"question": "A robe takes 2 bolts of blue fiber and half that much white fiber.  How many bolts in total does "
                 "it take?",
     "answer": "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total amount of fabric is 2+1=<<2+1=3>>3 bolts "
               "of fabric\n#### 3"},
    {"question": "Josh decides to try flipping a house.  He buys a house for $80,000 and then puts in $50,000 in "
                 "repairs.  This increased the value of the house by 150%.  How much profit did he make?",
     "answer": "The cost of the house and repairs came out to 80,000+50,000=$<<80000+50000=130000>>130,000\nHe "
               "increased the value of the house by 80,000*1.5=<<80000*1.5=120000>>120,000\nSo the new value of the "
               "house is 120,000+80,000=$<<120000+80000=200000>>200,000\nSo he made a profit of "
               "200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70000"},
    {"question": "A school has 8 classes with 200 students each. How many students does the school have?",
     "answer": "The school has 8 * 200 = <<8*200=1600>>1,600 students.\n#### 1,600"},
    {"question": "At dawn it was 5 degrees. By noon the temperature had fallen 8 degrees. What was the temperature "
                 "at noon?",
     "answer": "The temperature at noon was 5 - 8 = <<5-8=-3>>-3 degrees.\n#### -3"},
]
GSM8K_FINALS = ["18", "3", "70000", "1600", "-3"]

MATH_ROWS = [
    {"problem": "How many vertical asymptotes does the graph of $y=\\frac{2}{x^2+x-6}$ have?", "level": "Level 3",
     "type": "Algebra",
     "solution": "The denominator of the rational function factors into $x^2+x-6=(x-2)(x+3)$. Since the numerator "
                 "is always nonzero, there is a vertical asymptote whenever the denominator is $0$, which occurs for "
                 "$x = 2$ and $x = -3$.  Therefore, the graph has $\\boxed{2}$ vertical asymptotes."},
    {"problem": "Solve for $x$: $2x + 5 = -7$.", "level": "Level 1", "type": "Prealgebra",
     "solution": "Subtracting 5 from both sides gives $2x = -12$, so $x = \\boxed{-6}$."},
    {"problem": "What is $\\frac{1}{4} + \\frac{1}{4}$?", "level": "Level 1", "type": "Prealgebra",
     "solution": "We have $\\frac{1}{4} + \\frac{1}{4} = \\frac{2}{4} = \\boxed{\\frac{1}{2}}$."},
]
MATH_FINALS = ["2", "-6", "\\frac{1}{2}"]
