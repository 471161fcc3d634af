// Package subset is the deterministic subsetting shared by rollcall's gRPC
// policies (package grpcresolver) and its Picker (package selector): each
// of many clients uses only a subset of a large service's instances, so
// that a client keeps few connections and every instance serves about as
// many clients as any other.
//
// Clients are numbered 0, 1, 2, ... (the index each is configured with).
// They form rounds of S = ceil(n/size) consecutive indexes; in each round
// the n instances are divided into S subsets of n/S or n/S+1 instances (at
// most size), one per client of the round. Each instance is in exactly one
// subset of every round, so with dense indexes every instance serves the
// same number of clients (one per complete round), each with a subset of
// nearly the same size. The division of a round is
// pseudo-random (seeded by the round) and stable: an instance's subset
// depends on the instances hashed before it, so one instance leaving
// changes its own subset in each round and, usually, one other (the
// instance that moves into the freed place), about twice as many clients
// as the minimum; when n crosses a multiple of size, S changes and every
// subset is drawn anew.
//
// The division is a function of the instances' keys (addresses), the size
// and the index alone: every client computes it without talking to the
// others, and the same inputs give the same subsets in every process and
// version of rollcall that has this algorithm.
package subset

import (
	"cmp"
	"hash/fnv"
	"slices"
	"strconv"
)

// Choose returns the indexes into keys, ascending, of the subset of the
// client with index client (client >= 0) when each client should use size
// of the len(keys) instances. With size <= 0 or len(keys) <= size it
// returns every index. keys must be distinct.
func Choose(keys []string, size, client int) []int {
	n := len(keys)
	if size <= 0 || n <= size {
		out := make([]int, n)
		for i := range out {
			out[i] = i
		}
		return out
	}
	s := (n + size - 1) / size // subsets per round
	round, slot := client/s, client%s
	type item struct {
		h uint64
		i int
	}
	items := make([]item, n)
	for i, k := range keys {
		items[i] = item{hash(round, k), i}
	}
	// Instances take their places in the order of their hashes, each in
	// the first subset with room in its own pseudo-random sequence.
	slices.SortFunc(items, func(a, b item) int {
		if c := cmp.Compare(a.h, b.h); c != 0 {
			return c
		}
		return cmp.Compare(keys[a.i], keys[b.i])
	})
	// Subsets hold lo or lo+1 instances; extra of them hold lo+1.
	lo, extra := n/s, n%s
	count := make([]int, s)
	var out []int
	for _, it := range items {
		for x, try := it.h, 0; ; try++ {
			x = mix(x)
			b := int(x % uint64(s))
			if try >= 4*s { // rare: the places left are few; take the first
				b = slices.IndexFunc(count, func(c int) bool { return c < lo || c == lo && extra > 0 })
			}
			if count[b] < lo || count[b] == lo && extra > 0 {
				if count[b] == lo {
					extra--
				}
				count[b]++
				if b == slot {
					out = append(out, it.i)
				}
				break
			}
		}
	}
	slices.Sort(out)
	return out
}

func hash(round int, key string) uint64 {
	f := fnv.New64a()
	f.Write(strconv.AppendInt(nil, int64(round), 10))
	f.Write([]byte{'/'})
	f.Write([]byte(key))
	return mix(f.Sum64())
}

// mix is splitmix64's finalizer.
func mix(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}
