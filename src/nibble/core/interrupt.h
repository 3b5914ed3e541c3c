// Ctrl-C (SIGINT) and SIGTERM during a long job: the first one only sets a flag, which the job
// checks at safe points and turns into a nibble::Error, so the stack unwinds and temporary files
// are removed (a default SIGINT would leave them); a second one terminates at once, as usual.
#pragma once

#include <string>

namespace nibble {

void install_interrupt_handler();
// Throws nibble::Error(where, "interrupted ...") once a signal has arrived.
void throw_if_interrupted(const std::string& where);
// Sets the flag as a signal would (tests).
void request_interrupt();

}  // namespace nibble
