"""Running a study (runner layer): the jobs and their graph (:mod:`.jobs`), the cluster (:mod:`.scale`),
the study (:mod:`.study`), its plan (:mod:`.plan`) and the data checks of validate (:mod:`.checks`)."""
