// Charts through gnuplot (Debian's gnuplot-nox), for the commands that write a PNG beside their table.
#pragma once

#include <optional>
#include <string>

namespace nibble::cli {

// A name as a double-quoted gnuplot data string: gnuplot reads it as data, never as a command.
// Quotes, backslashes and control characters (a newline could end the data block) become '?'.
std::string gnuplot_data_string(const std::string& s);

// Runs gnuplot on `script` (its stdin) and returns the image it writes to stdout; nullopt when
// gnuplot is missing or fails. No shell, no file name in the script: nothing a user names is code.
std::optional<std::string> run_gnuplot(const std::string& script);

}  // namespace nibble::cli
