package plugin

import (
	"errors"

	"github.com/arenahost/arenahost/host/arena"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// ArenaOf adapts the host's arena to the Arena the manager consumes:
// regions become protocol Regions carrying their segment's location, and
// owners are the arena's plugin owners ("plugin:NAME#GEN").
func ArenaOf(a *arena.Arena) Arena { return arenaAdapter{a} }

type arenaAdapter struct{ a *arena.Arena }

func (x arenaAdapter) Alloc(owner, name string, n uint64) (*pluginv1.Region, error) {
	r, err := x.a.Alloc(arena.Owner(owner), name, n)
	if err != nil {
		return nil, err
	}
	loc, err := x.a.Location(r)
	if err != nil {
		return nil, errors.Join(err, x.a.Free(r))
	}
	return RegionProto(r, loc), nil
}

func (x arenaAdapter) Free(owner string, r *pluginv1.Region) error {
	ar, err := arenaRegion(r)
	if err != nil {
		return err
	}
	return x.a.FreeOwned(arena.Owner(owner), ar)
}

func (x arenaAdapter) ReleaseOwner(owner string) error {
	x.a.ReleaseOwner(arena.Owner(owner))
	return nil
}

// RegionProto is the protocol form of an arena region at loc.
func RegionProto(r arena.Region, loc arena.Location) *pluginv1.Region {
	return arena.RegionProto(r, loc)
}

func arenaRegion(r *pluginv1.Region) (arena.Region, error) { return arena.RegionFromProto(r) }
