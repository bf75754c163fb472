"""The built-in name list of the PhoneBook generator: common given names and family names,
combined into full names (132 x 131 = 17292 distinct people)."""

from __future__ import annotations

GIVEN_NAMES = """
Aaron Abigail Adam Adrian Alan Albert Alice Amanda Amy Andrea Andrew Angela Anna Anthony Arthur
Ashley Barbara Benjamin Betty Beverly Brandon Brenda Brian Bruce Carl Carol Catherine Charles
Cheryl Christian Christina Christine Christopher Cynthia Daniel David Deborah Denise Dennis Diana
Diane Donald Donna Dorothy Douglas Dylan Edward Elizabeth Emily Emma Eric Ethan Eugene Evelyn
Frances Frank Gabriel Gary George Gerald Gloria Grace Gregory Hannah Harold Heather Helen Henry
Isabella Jack Jacob Jacqueline James Janet Janice Jason Jean Jeffrey Jennifer Jeremy Jerry
Jessica Joan Joe John Jonathan Jordan Jose Joseph Joshua Joyce Judith Julia Julie Justin Karen
Katherine Kathleen Kayla Keith Kelly Kenneth Kevin Kimberly Kyle Larry Laura Lauren Lawrence
Linda Lisa Logan Louis Madison Margaret Maria Marie Marilyn Mark Martha Mary Matthew Megan
Melissa Michael Michelle Nancy Natalie Nathan Nicholas Nicole Noah
""".split()

FAMILY_NAMES = """
Adams Alexander Allen Alvarez Anderson Bailey Baker Barnes Bell Bennett Brooks Brown Bryant
Butler Campbell Carter Castillo Chavez Clark Coleman Collins Cook Cooper Cox Cruz Davis Diaz
Edwards Evans Fisher Flores Ford Foster Garcia Gibson Gomez Gonzales Gonzalez Graham Gray Green
Griffin Gutierrez Hall Hamilton Harris Hayes Henderson Hernandez Hill Howard Hughes Jackson James
Jenkins Jimenez Johnson Jones Jordan Kelly Kennedy Kim King Lee Lewis Long Lopez Marshall
Martin Martinez Mendoza Miller Mitchell Moore Morales Morgan Morris Murphy Murray Myers Nelson
Nguyen Ortiz Owens Parker Patel Patterson Perez Perry Peterson Phillips Powell Price Ramirez
Ramos Reed Reyes Reynolds Richardson Rivera Roberts Robinson Rodriguez Rogers Ross Russell
Sanchez Sanders Scott Simmons Smith Stewart Sullivan Taylor Thomas Thompson Torres Turner Walker
Wallace Ward Washington Watson Webb West White Williams Wilson Wood Wright Young
""".split()
