from vanishlab.report.write import main

main()
