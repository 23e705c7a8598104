# One helper per target kind, so every folder declares its targets the same way.

set(KILN_WARNINGS -Wall -Wextra -Wno-unused-parameter)
if(CMAKE_CXX_COMPILER_ID MATCHES "Clang")
  # GCC ignores Abseil's lock annotations; clang checks them.
  list(APPEND KILN_WARNINGS -Wthread-safety)
endif()
option(KILN_WERROR "Treat warnings in Kiln's own code as errors" OFF)
if(KILN_WERROR)
  list(APPEND KILN_WARNINGS -Werror)
endif()

# kiln_library(NAME SRCS ... DEPS ...)
function(kiln_library name)
  cmake_parse_arguments(ARG "" "" "SRCS;DEPS" ${ARGN})
  add_library(${name} STATIC ${ARG_SRCS})
  target_include_directories(${name} PUBLIC ${PROJECT_SOURCE_DIR})
  target_compile_options(${name} PRIVATE ${KILN_WARNINGS})
  target_link_libraries(${name} PUBLIC ${ARG_DEPS})
endfunction()

# kiln_binary(NAME SRCS ... DEPS ...): a thin main over libraries.
function(kiln_binary name)
  cmake_parse_arguments(ARG "" "" "SRCS;DEPS" ${ARGN})
  add_executable(${name} ${ARG_SRCS})
  target_compile_options(${name} PRIVATE ${KILN_WARNINGS})
  target_link_libraries(${name} PRIVATE ${ARG_DEPS})
  set_target_properties(${name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/bin)
endfunction()

# Tests' own code is compiled without optimisation: it is a third less
# compile time (e2e_build_test.cc: 20 s at -O2, 13 s at -O0), and what they
# exercise (the libraries, the daemons) keeps the build's flags.
set(KILN_TEST_OPTIMIZE -O0)

# kiln_test(NAME SRCS ... DEPS ... [LABELS ...] [TIMEOUT s])
function(kiln_test name)
  cmake_parse_arguments(ARG "" "TIMEOUT" "SRCS;DEPS;LABELS" ${ARGN})
  add_executable(${name} ${ARG_SRCS})
  target_compile_options(${name} PRIVATE ${KILN_WARNINGS} ${KILN_TEST_OPTIMIZE})
  target_link_libraries(${name} PRIVATE ${ARG_DEPS} GTest::gmock GTest::gtest_main)
  add_test(NAME ${name} COMMAND ${name})
  set(labels unit)
  if(ARG_LABELS)
    set(labels ${ARG_LABELS})
  endif()
  set(timeout 120)
  if(ARG_TIMEOUT)
    set(timeout ${ARG_TIMEOUT})
  endif()
  set_tests_properties(${name} PROPERTIES LABELS "${labels}" TIMEOUT ${timeout}
    ENVIRONMENT "KILN_BIN_DIR=${PROJECT_BINARY_DIR}/bin;KILN_SOURCE_DIR=${PROJECT_SOURCE_DIR}")
  # scripts/test runs the unit tests in its sanitizer tree only: the main
  # tree then need not compile them (a minute of CI's two cores).
  if("unit" IN_LIST labels AND NOT KILN_UNIT_TESTS_IN_ALL)
    set_target_properties(${name} PROPERTIES EXCLUDE_FROM_ALL ON)
  endif()
endfunction()
