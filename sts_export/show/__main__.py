from sts_export.show.compare import main

main()
