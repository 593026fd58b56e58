"""Inputs built to hang or blow up a naive verifier; each must score False within the time limit."""

N = 5000
SUM = "+".join(["1"] * 50_000)  # 100k characters

# (name, solution, gold)
CASES = [
    ("tower_9999", r"\boxed{9^9^9^9}", "1"),
    ("tower_braced", r"\boxed{9^{9^{9^{9}}}}", "1"),
    ("tower_2222", r"\boxed{2^{2^{2^{2^{2^{2}}}}}}", "2"),
    ("tower_10_10_10", r"\boxed{10^{10^{10}}}", "10"),
    ("tower_e", r"\boxed{e^{e^{e^{e^{10}}}}}", "e"),
    ("factorial_googol", r"\boxed{(10^{100})!}", "1"),
    ("factorial_googol_bare", r"\boxed{10^{100}!}", "1"),
    ("factorial_big_literal", r"\boxed{99999999999999!}", "0"),
    ("factorial_chain", r"\boxed{9!!!!!!!!!!}", "9"),
    ("binom_huge", r"\boxed{\binom{10^{50}}{10^{25}}}", "1"),
    ("gamma_huge", r"\boxed{\Gamma(10^{100})}", "1"),
    ("sum_huge", r"\boxed{\sum_{n=1}^{10^{10}} n}", "1"),
    ("prod_huge", r"\boxed{\prod_{n=1}^{10^{10}} n}", "1"),
    ("pow_big_exponent", r"\boxed{2^{100000}}", "3"),
    ("pow_of_pow", r"\boxed{(10^{400})^{10000}}", "1"),
    ("pow_symbolic_big", r"\boxed{x^{10^{9}}}", "x"),
    ("sci_exponent_huge", r"\boxed{1e999999999}", "1"),
    ("sci_negative_huge", r"\boxed{10^{-999999999}}", "0"),
    ("decimal_exponent_huge", r"\boxed{1.5e-99999}", "0"),
    ("nested_braces_5000", r"\boxed{" + "{" * N + "1" + "}" * N + "}", "1"),
    ("nested_parens_5000", r"\boxed{" + "(" * N + "1" + ")" * N + "}", "2"),
    ("nested_sqrt_1000", r"\boxed{" + r"\sqrt{" * 1000 + "2" + "}" * 1000 + "}", "2"),
    ("nested_frac_2000", r"\boxed{" + r"\frac{1}{" * 2000 + "2" + "}" * 2000 + "}", "1"),
    ("sum_100k", r"\boxed{" + SUM + "}", "50001"),
    ("sum_100k_gold", r"\boxed{50000}", SUM + "+1"),
    ("giant_integer", r"\boxed{" + "9" * 100_000 + "}", "9" * 99_999 + "8"),
    ("giant_integer_prose", "The answer is " + "7" * 100_000, "7"),
    ("unbalanced_boxes", r"\boxed{" * 20_000, "1"),
    ("many_boxes", r"\boxed{1} " * 15_000, "2"),
    ("spaces_100k", " " * 100_000, "1"),
    ("letters_100k", r"\boxed{" + "x" * 100_000 + "}", "x"),
    ("left_paren_flood", r"\boxed{" + r"\left(" * 20_000 + "}", "1"),
    ("frac_flood", r"\boxed{" + r"\frac{1}{2}+" * 8_000 + "1}", "1"),
    ("div_zero", r"\boxed{\frac{1}{0}}", "1"),
    ("zero_over_zero", r"\boxed{0/0}", "0"),
    ("inf_minus_inf", r"\boxed{\infty-\infty}", "0"),
    ("sin_googol", r"\boxed{\sin(10^{100})}", "0"),
    ("factorial_power", r"\boxed{(1000!)^{9999}}", "1"),  # 25M-digit integer: minutes of bignum work
    ("expand_bomb", r"\boxed{(a+b+c+d+e)^{100}}", "(a+b+c+d+f)^{100}"),
    ("matrix_big", r"\boxed{\begin{pmatrix}" + r"\\".join(["&".join(["1"] * 60)] * 60) + r"\end{pmatrix}}", "1"),
]
