//go:build race

package nacosserver

const raceEnabled = true
